"""The stations' public keys: registered one at a time or from a directory of
``<station>.pem`` files, kept in the ``stations`` table."""

import os

from cryptography.hazmat.primitives import serialization

from evse_tools.cli.ocmf_verify import load_public_key

from .ingest import Ingestor

KEY_SUFFIX = ".pem"


def pem_of(path):
    """The public key in the file at ``path`` (PEM, or hex of DER) as PEM text; ValueError
    naming the file if it holds no P-256 public key."""
    if not os.path.isfile(path):
        raise ValueError("key file %s does not exist" % path)
    key = load_public_key(path)
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def register_key(store, station, pem):
    """Store ``pem`` as the key of ``station`` and verify its sessions again; returns
    (key changed, sessions whose verdict changed)."""
    if not station or "/" in station or "+" in station or "#" in station:
        raise ValueError("station id %r is not a single MQTT topic level" % station)
    with store.transaction():
        old = store.query("SELECT public_key_pem FROM stations WHERE station = ?", (station,))
        if old and old[0][0] == pem:
            return False, 0
        store.execute("INSERT INTO stations (station, public_key_pem) VALUES (?, ?) "
                      "ON CONFLICT (station) DO UPDATE SET public_key_pem = excluded.public_key_pem",
                      (station, pem))
    return True, Ingestor(store).reverify(station)


def register_key_dir(store, directory):
    """Register every ``<station>.pem`` in ``directory``; returns {station: (changed,
    reverified)}. ValueError names the first file that is not a usable key."""
    if not os.path.isdir(directory):
        raise ValueError("key directory %s does not exist" % directory)
    results = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(KEY_SUFFIX):
            station = name[:-len(KEY_SUFFIX)]
            results[station] = register_key(store, station, pem_of(os.path.join(directory, name)))
    return results
