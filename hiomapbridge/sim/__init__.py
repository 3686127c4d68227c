"""Real peers for hiomapbridge: a hiomapd emulator, a btbridged stand-in and a host."""
