"""Table types, one file each, all behind the Table interface of ``base``."""
