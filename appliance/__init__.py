"""appliance: device-mapper-style virtual block devices exported over NBD."""

__version__ = "0.1.0"

SECTOR_SIZE = 512
