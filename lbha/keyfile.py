"""The heartbeat's auth key file: one reader for the daemon and for `lbha config check`.

The file holds lines `ID KEY` (ID 1..255, KEY one token of at least MIN_KEY_LENGTH
characters; `#` comments and blank lines ignored); frames are sent with the first key.

A symlink is followed (configuration managers link /etc files into place), but what is checked
is the file it leads to: a regular file, owned by root or by us, that no other user can read.
The resolved target is opened with O_NOFOLLOW, so a link swapped in between is refused rather
than followed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lbha.errors import LbhaError

MIN_KEY_LENGTH = 16
#: A key file is a few lines; anything larger is not one.
MAX_KEY_FILE_BYTES = 64 * 1024


class KeyFileError(LbhaError):
    """The auth key file is missing, unsafe (group/world readable) or malformed."""


def read_key_file(path: Path) -> tuple[dict[int, bytes], int]:
    """The keys by id and the id to send with; raises KeyFileError saying what to fix."""
    try:
        target = Path(os.path.realpath(path, strict=True))
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise KeyFileError(
            f"cannot open auth key file {path}: {exc.strerror}; create the same one on both "
            f"nodes: (umask 077; echo \"1 $(openssl rand -hex 32)\" > {path})") from None
    except OSError as exc:
        raise KeyFileError(f"cannot open auth key file {path}: {exc.strerror}") from None
    shown = str(path) if target == Path(path) else f"{path} (-> {target})"
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"auth key file {shown} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"auth key file {shown} has mode {stat.S_IMODE(st.st_mode):04o}: other users "
                f"could read the key; run `chmod 600 {target}`"
            )
        if st.st_uid not in (0, os.geteuid()):
            raise KeyFileError(f"auth key file {shown} is owned by uid {st.st_uid}; "
                               f"run `chown root {target}`")
        data = f.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"auth key file {shown} is over {MAX_KEY_FILE_BYTES // 1024} KiB: "
                           "not a key file")
    return parse_keys(data.decode("utf-8", errors="replace"), str(path))


def parse_keys(text: str, source: str = "<keys>") -> tuple[dict[int, bytes], int]:
    """Keys by id and the first id listed, from the text of a key file."""
    keys: dict[int, bytes] = {}
    first: int | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{source}:{number}"
        if len(parts) != 2 or not parts[0].isdigit():
            raise KeyFileError(f"{where}: expected `ID KEY` (ID 1..255, KEY one word)")
        key_id, key = int(parts[0]), parts[1].encode()
        if not 1 <= key_id <= 255:
            raise KeyFileError(f"{where}: key id {key_id} is out of range 1..255")
        if key_id in keys:
            raise KeyFileError(f"{where}: key id {key_id} is listed twice")
        if len(key) < MIN_KEY_LENGTH:
            raise KeyFileError(f"{where}: key {key_id} is shorter than {MIN_KEY_LENGTH} "
                               "characters; generate one with `openssl rand -hex 32`")
        keys[key_id] = key
        first = key_id if first is None else first
    if first is None:
        raise KeyFileError(f"{source}: no key found (lines `ID KEY`)")
    return keys, first
