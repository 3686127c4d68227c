"""hiomapbridge: HIOMAP over IPMI between btbridged and hiomapd, on trio."""

__version__ = "0.1.0"
