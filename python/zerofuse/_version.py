# Single source of the version: pyproject.toml and CMakeLists.txt both read it.
__version__ = "0.1.0"
