SUMMARY = "Low-level, pure Python DBus protocol wrapper"
DESCRIPTION = "Jeepney builds and parses D-Bus messages in pure Python, with \
I/O integrations for blocking sockets, threads, asyncio and trio."
HOMEPAGE = "https://gitlab.com/takluyver/jeepney"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://LICENSE;md5=aad69c93f605003e3342b174d9b0708c"

SRC_URI[sha256sum] = "cf0e9e845622b81e4a28df94c40345400256ec608d0e55bb8a3feaa9163f5732"

# jeepney 0.9.0 builds with flit_core >= 3.11 (python3-flit-core-native).
# On a release whose flit-core is older, use 0.8.0 instead (flit_core >= 3.2;
# hiomapbridge needs jeepney >= 0.8): rename to python3-jeepney_0.8.0.bb and
# put 0.8.0's sdist checksum here.
inherit pypi python_flit_core

# What jeepney's core and jeepney.io.trio import from the standard library
# (array, binascii, errno, itertools, os, struct, warnings... are in
# python3-core). jeepney.io.trio also needs trio and outcome: they are an
# optional extra of jeepney, and hiomapbridge's python3-trio brings both.
RDEPENDS:${PN} = " \
    python3-core \
    python3-io \
    python3-logging \
    python3-stringold \
    python3-typing \
"

BBCLASSEXTEND = "native nativesdk"
