"""ailfmd: thermal-aware scheduling for CPU inference servers."""

__version__ = "0.1.0"
