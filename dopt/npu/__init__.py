"""The target NPU as data: hardware profiles (operator table, alignment, numerics, cost
constants) that the compiler, report, partitioner, cost model and docs all read."""
