SUMMARY = "HIOMAP-over-IPMI bridge between the host and hiomapd"
DESCRIPTION = "hiomapbridge carries HIOMAP (host firmware flash access) over \
IPMI between the host and hiomapd, and delivers hiomapd's events to the host \
before it exits. It replaces ipmid's openpower-host-ipmi-flash plugin. \
hiomapbridge-bt owns the BT host interface itself (in btbridged's place) and \
forwards every other IPMI command to ipmid; hiomapbridge-btbridged sits \
behind btbridged, for images without ipmid."
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

# The sdist carries contrib/ (units, policies, udev rule) next to the code:
# build it with `bash .ci/nox -s build` (or `uv build --sdist`) and copy
# dist/hiomapbridge-${PV}.tar.gz into files/ beside this recipe. To build from
# git instead: SRC_URI = "git://...;protocol=https;branch=...", SRCREV, and
# S = "${WORKDIR}/git" (S = "${UNPACKDIR}/git" on walnascar and later).
SRC_URI = "file://hiomapbridge-${PV}.tar.gz"

inherit python_hatchling systemd useradd

# Two ways to deploy (README "Deploying on OpenBMC"); install exactly one.
#   hiomapbridge-bt         owns /dev/ipmi-bt-host in btbridged's place and
#                           forwards everything else to ipmid: any image with
#                           ipmid (phosphor-ipmi-host)
#   hiomapbridge-btbridged  behind btbridged: only where nothing else answers
#                           btbridged's ReceivedMessage (no ipmid)
# Their D-Bus policies are for the same user and contradict each other, and
# their units conflict: the packages conflict too.
PACKAGE_BEFORE_PN = "${PN}-bt ${PN}-btbridged"

# The daemon's run-time needs: pyproject.toml's [project.dependencies] plus
# the standard-library pieces it imports (tests/test_openbmc_recipes.py keeps
# this list in step with both).
RDEPENDS:${PN} = " \
    python3-attrs \
    python3-core \
    python3-fcntl \
    python3-io \
    python3-jeepney \
    python3-logging \
    python3-trio \
    python3-typing \
"

RDEPENDS:${PN}-bt = "${PN}"
RRECOMMENDS:${PN}-bt = "phosphor-ipmi-host"
RCONFLICTS:${PN}-bt = "${PN}-btbridged phosphor-ipmi-bt"
RPROVIDES:${PN}-bt = "virtual-obmc-host-ipmi-hw"

RDEPENDS:${PN}-btbridged = "${PN}"
RRECOMMENDS:${PN}-btbridged = "phosphor-ipmi-bt"
RCONFLICTS:${PN}-btbridged = "${PN}-bt"

SYSTEMD_PACKAGES = "${PN}-bt ${PN}-btbridged"
SYSTEMD_SERVICE:${PN}-bt = "hiomapbridge-bt.service"
SYSTEMD_SERVICE:${PN}-btbridged = "hiomapbridge.service"

# The unit's User=/Group= and the D-Bus policies' user (contrib/sysusers.d has
# the same user for systemd-sysusers; OpenBMC images create users here).
USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --no-create-home --home-dir /nonexistent --shell /sbin/nologin --user-group hiomapbridge"

FILES:${PN}-bt = " \
    ${systemd_system_unitdir}/hiomapbridge-bt.service \
    ${systemd_system_unitdir}/mboxd.service.d/hiomapbridge-bt.conf \
    ${datadir}/dbus-1/system.d/hiomapbridge-bt.conf \
    ${nonarch_base_libdir}/udev/rules.d/70-hiomapbridge-bt.rules \
"
FILES:${PN}-btbridged = " \
    ${systemd_system_unitdir}/hiomapbridge.service \
    ${systemd_system_unitdir}/mboxd.service.d/hiomapbridge.conf \
    ${datadir}/dbus-1/system.d/hiomapbridge.conf \
"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}/mboxd.service.d
    install -d ${D}${datadir}/dbus-1/system.d
    install -d ${D}${nonarch_base_libdir}/udev/rules.d

    install -m 0644 ${S}/contrib/bt/hiomapbridge-bt.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/contrib/bt/mboxd.service.d/hiomapbridge-bt.conf ${D}${systemd_system_unitdir}/mboxd.service.d/
    install -m 0644 ${S}/contrib/bt/dbus-1/system.d/hiomapbridge-bt.conf ${D}${datadir}/dbus-1/system.d/
    install -m 0644 ${S}/contrib/bt/udev/rules.d/70-hiomapbridge-bt.rules ${D}${nonarch_base_libdir}/udev/rules.d/

    install -m 0644 ${S}/contrib/hiomapbridge.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/contrib/mboxd.service.d/hiomapbridge.conf ${D}${systemd_system_unitdir}/mboxd.service.d/
    install -m 0644 ${S}/contrib/dbus-1/system.d/hiomapbridge.conf ${D}${datadir}/dbus-1/system.d/

    # The flash bench and the demo (hiomapbridge.sim) are development tools.
    rm -f ${D}${bindir}/hiomapbridge-sim ${D}${bindir}/hiomapbridge-demo
}
