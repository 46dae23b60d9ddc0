"""Drop-ins that route other libraries' models through shammie's kernels."""
