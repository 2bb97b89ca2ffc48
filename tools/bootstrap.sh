#!/bin/sh
# Install the system packages the agent's host tooling needs, if they are missing:
# python3 (3.11+) with venv, mosquitto (the MQTT broker tests and the demo run), and node
# with npm (they run MicroPython's WebAssembly port for the core's MicroPython scenarios), and
# the PostgreSQL server (the fleet collector's tests start a throwaway cluster of their own).
# Debian/Ubuntu with apt-get; run as root (or with sudo available).
set -eu

missing=""
if ! command -v python3 >/dev/null 2>&1; then
    missing="$missing python3 python3-venv"
elif ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing="$missing python3-venv"
fi
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    missing="$missing mosquitto"
fi
if ! command -v mosquitto_sub >/dev/null 2>&1; then
    missing="$missing mosquitto-clients"  # make bench: the broker's delivery to a bare subscriber
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    missing="$missing nodejs npm"
fi
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    missing="$missing postgresql"
fi
[ -z "$missing" ] && exit 0

echo "bootstrap: installing system packages:$missing"
if ! command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: error: apt-get not found; install$missing with your package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "bootstrap: error: need root to install$missing (run as root or install sudo)" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get update -qq || ! $SUDO apt-get install -y -qq --no-install-recommends $missing; then
    echo "bootstrap: error: apt-get could not install$missing" >&2
    exit 1
fi
# The Debian packages enable a system broker on port 1883 and a database cluster on port
# 5432; the tests and demo start their own.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
    $SUDO systemctl disable --now postgresql >/dev/null 2>&1 || true
fi
