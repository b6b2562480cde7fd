"""Calibration: the streaming loop every adapter shares, the reference's calibration sets
(BINARY 610/510, IMAGE folders) and its ``config.prototxt``."""
