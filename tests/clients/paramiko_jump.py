"""Paramiko (the SSH library under Ansible and many editors' tools) through Tether's front door.

Usage: paramiko_jump.py HOST PORT USER KEY WORKSPACE FILE

Logs in to the front door at HOST:PORT as USER with the ed25519 KEY, opens a direct-tcpip channel
to WORKSPACE port 22 (what `ssh -J` does), logs in to the workspace over it with the same key,
runs a command, and copies FILE up and back with SFTP. Prints one JSON object: each host key
seen, the command's output and exit status, what the transports negotiated, and the SFTP results.
"""

import json
import sys

import paramiko

host, port, user, key_file, workspace, local = sys.argv[1:7]
key = paramiko.Ed25519Key.from_private_key_file(key_file)
seen = {}


class Record(paramiko.MissingHostKeyPolicy):
    """Accepts and records a host key; the test compares it with the server's key file."""

    def __init__(self, name):
        self.name = name

    def missing_host_key(self, client, hostname, k):
        seen[self.name] = k.get_name() + " " + k.get_base64()


def negotiated(transport):
    return {
        "cipher": transport.remote_cipher,
        "mac": transport.remote_mac,
        "host_key": transport.host_key_type,
    }


options = dict(username=user, pkey=key, allow_agent=False, look_for_keys=False, timeout=60, banner_timeout=60)
jump = paramiko.SSHClient()
jump.set_missing_host_key_policy(Record("front_door"))
jump.connect(host, int(port), **options)
channel = jump.get_transport().open_channel("direct-tcpip", (workspace, 22), ("127.0.0.1", 0), timeout=60)
inner = paramiko.SSHClient()
inner.set_missing_host_key_policy(Record("workspace"))
inner.connect(workspace, 22, sock=channel, **options)

_, stdout, _ = inner.exec_command("echo from paramiko; exit 7", timeout=60)
output = stdout.read().decode()
status = stdout.channel.recv_exit_status()

sftp = inner.open_sftp()
sftp.put(local, "paramiko-up.bin")
size = sftp.stat("paramiko-up.bin").st_size
sftp.get("paramiko-up.bin", local + ".back")
sftp.remove("paramiko-up.bin")
listed = "paramiko-up.bin" in sftp.listdir(".")
sftp.close()

print(json.dumps({
    "host_keys": seen,
    "output": output,
    "status": status,
    "outer": negotiated(jump.get_transport()),
    "inner": negotiated(inner.get_transport()),
    "uploaded_size": size,
    "still_listed_after_remove": listed,
}))
inner.close()
jump.close()
