"""Single source of shammie's version; CMake and setup.py read it from here."""

__version__ = "0.1.0"
