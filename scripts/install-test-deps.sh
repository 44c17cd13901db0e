#!/bin/sh
# Everything the test suite needs on a fresh Debian/Ubuntu machine (run as root):
# Debian's Postfix and its map packages (the interop tests use the real postmap,
# postconf and Postfix's own client library as the oracle), then a virtualenv
# with the project and its test tools. Safe to run again.
set -eu
cd "$(dirname "$0")/.."

need=""
for p in postfix postfix-lmdb postfix-cdb postfix-pcre libdb5.3-dev \
    postfix-ldap slapd ldap-utils memcached libldap2-dev libsasl2-dev \
    postfix-pgsql postfix-mysql postfix-sqlite; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need="$need $p"
done
# Debian's own python3 needs python3-venv for "python3 -m venv"; other builds have it.
python3 -c "import ensurepip" 2>/dev/null || need="$need python3-venv"
# python-ldap (ldap: tables) has no wheels: it compiles against Python.h and libldap.
python3 -c "import os, sysconfig; os.stat(sysconfig.get_paths()['include'] + '/Python.h')" \
    2>/dev/null || need="$need python3-dev"
if [ -n "$need" ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    # "No configuration": install the programs without configuring or starting a system
    # Postfix; the tests run their own throwaway configurations.
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    # Likewise slapd: no system directory is configured; the tests start their own slapd.
    echo "slapd slapd/no_configuration boolean true" | $SUDO debconf-set-selections
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $need
fi

scripts/venv.sh all,test
