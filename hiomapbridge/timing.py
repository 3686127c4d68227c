"""The timing budget: every deadline in the chain fits inside the next one.

A host request must be answered before whoever waits on it gives up:

* skiboot (``hw/bt.c``) times a BT request out, and sends it again, after
  the transaction time the BMC advertised in Get BT Interface Capabilities
  (3 s and one retry when the BMC does not answer that command).  A retried
  ACK, GET_INFO or RESET would reach hiomapd twice: those commands are
  exempt from HIOMAP's sequence rule.  So the bridge advertises a
  transaction time strictly longer than each of its own deadlines.
* btbridged answers the host cc 0xCE itself after 5 s (btbridged mode), so
  what the bridge advertises must stay inside that.
* QEMU's ``ipmi-bmc-extern`` answers 0xC3 itself after 4 s of virtual time
  (the QEMU host of the demo and tests), so the bridge's deadlines stay
  under that too.

``hiomapd deadline, ipmid deadline < advertised transaction time
(< btbridged's 5 s in btbridged mode)``: :func:`violations` checks a
configuration against it; the CLI refuses (exit 2) what breaks it.
"""

from __future__ import annotations

from typing import Final, Protocol

#: skiboot's BT request timeout without a capabilities answer (it then
#: retries once).
SKIBOOT_DEFAULT_TIMEOUT: Final = 3
#: btbridged's own cut-off (it answers cc 0xCE itself).
BTBRIDGED_TIMEOUT: Final = 5.0
#: QEMU ipmi-bmc-extern's own cut-off (it answers cc 0xC3 itself).
QEMU_TIMEOUT: Final = 4.0


class Timing(Protocol):
    @property
    def bt_path(self) -> str | None: ...
    @property
    def hiomapd_timeout(self) -> float: ...
    @property
    def ipmid_timeout(self) -> float: ...
    @property
    def bt_transaction_time(self) -> int: ...


def violations(config: Timing) -> list[str]:
    """Each limit of the budget that ``config`` breaks, as a sentence."""
    found = []
    advertised = config.bt_transaction_time
    if not config.hiomapd_timeout < advertised:
        found.append(
            f"--hiomapd-timeout ({config.hiomapd_timeout:g} s) must be shorter than "
            f"--bt-transaction-time ({advertised} s): the host would time out and "
            "retry a HIOMAP request the bridge is still waiting on"
        )
    if config.bt_path is not None and not config.ipmid_timeout < advertised:
        found.append(
            f"--ipmid-timeout ({config.ipmid_timeout:g} s) must be shorter than "
            f"--bt-transaction-time ({advertised} s): the host would time out and "
            "retry a command the bridge is still forwarding"
        )
    if config.bt_path is None and not advertised < BTBRIDGED_TIMEOUT:
        found.append(
            f"--bt-transaction-time ({advertised} s) must be shorter than "
            f"btbridged's own {BTBRIDGED_TIMEOUT:g} s timeout (it answers the "
            "host cc 0xCE itself after that)"
        )
    return found
