"""Framework adapters: each registers pluggy hook implementations under the ``dopt`` group."""
