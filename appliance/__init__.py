"""appliance: device-mapper-style virtual block devices exported over NBD."""

__version__ = "0.1.0"

SECTOR_SIZE = 512


def size_text(n):
    """A byte count for people: "512 B", "1.5 MiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
