"""A data directory on a disk that /etc/fstab lists but that is not mounted (yet): nothing is
written beneath the mount point. The daemon waits for the mount, a command refuses at once.
The end-to-end test runs the real daemon in a mount namespace of its own, with its own
/etc/fstab bound over the real one and a real tmpfs mounted as "the disk"."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from meraudiod.config import Settings
from meraudiod.db import open_db
from meraudiod.mounts import (
    NotMounted,
    listed_mount_points,
    missing_mount,
    mounted_points,
    storage_dirs,
    unmounted_paths,
    wait_for_mounts,
)

from .broker import free_port
from .conftest import DEMO, cli, needs_root


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_fstab_and_mountinfo_are_read_as_the_kernel_writes_them(tmp_path: Path) -> None:
    fstab = write(
        tmp_path / "fstab",
        "# /etc/fstab\n"
        "UUID=1 / ext4 defaults 0 1\n"
        "\n"
        "UUID=2 none swap sw 0 0\n"
        "LABEL=usb /mnt/usb\\040disk ext4 defaults,nofail 0 2\n"
        "server:/x /srv/nfs nfs defaults 0 0\n"
        "   # an indented comment\n",
    )
    assert listed_mount_points(fstab) == [Path("/mnt/usb disk"), Path("/srv/nfs")]
    assert listed_mount_points(tmp_path / "no-such-fstab") == []
    mountinfo = write(
        tmp_path / "mountinfo",
        "22 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw\n"
        "66 22 8:17 / /mnt/usb\\040disk rw,relatime shared:40 - ext4 /dev/sdb1 rw\n",
    )
    assert mounted_points(mountinfo) == {Path("/"), Path("/mnt/usb disk")}


def test_the_deepest_listed_mount_point_above_a_directory_decides(tmp_path: Path) -> None:
    fstab = write(tmp_path / "fstab", "a /mnt ext4 defaults 0 2\nb /mnt/usb ext4 defaults 0 2\n")
    nothing = write(tmp_path / "mountinfo", "22 1 8:2 / / rw - ext4 /dev/sda2 rw\n")
    usb = write(
        tmp_path / "mountinfo-usb",
        "22 1 8:2 / / rw - ext4 /dev/sda2 rw\n23 22 8:17 / /mnt/usb rw - ext4 /dev/sdb1 rw\n",
    )
    data = Path("/mnt/usb/meraudiod")
    assert missing_mount(data, fstab, nothing) == Path("/mnt/usb")
    assert missing_mount(data, fstab, usb) is None  # /mnt itself not mounted: not its disk
    assert missing_mount(Path("/mnt/other"), fstab, usb) == Path("/mnt")
    assert missing_mount(Path("/var/lib/meraudiod"), fstab, nothing) is None
    assert missing_mount(Path("/mnt/usbstick/x"), fstab, usb) == Path("/mnt")  # not a prefix
    # A symlink into the unmounted disk is followed.
    link = tmp_path / "link"
    link.symlink_to("/mnt/usb/meraudiod")
    assert missing_mount(link, fstab, nothing) == Path("/mnt/usb")


def test_each_storage_directory_is_named_by_its_key(tmp_path: Path, settings: Settings) -> None:
    point = tmp_path / "disk"
    fstab = write(tmp_path / "fstab", f"LABEL=x {point} ext4 defaults 0 2\n")
    mountinfo = write(tmp_path / "mountinfo", "22 1 8:2 / / rw - ext4 /dev/sda2 rw\n")
    assert unmounted_paths(storage_dirs(settings), fstab, mountinfo) is None  # elsewhere
    settings.storage.tmp_audio_dir = point / "audio"
    assert unmounted_paths(storage_dirs(settings), fstab, mountinfo) == (
        f"storage.tmp_audio_dir: {point / 'audio'} is on {point}, which {fstab} lists but"
        " nothing is mounted on"
    )


def test_the_wait_ends_when_mounted_when_stopped_or_after_its_time(
    tmp_path: Path, settings: Settings
) -> None:
    point = tmp_path / "disk"
    settings.storage.data_dir = point / "meraudiod"
    fstab = write(tmp_path / "fstab", f"LABEL=x {point} ext4 defaults 0 2\n")
    mountinfo = write(tmp_path / "mountinfo", "22 1 8:2 / / rw - ext4 /dev/sda2 rw\n")
    dirs = storage_dirs(settings)
    said: list[str] = []
    stop = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(NotMounted, match=r"storage.data_dir: .* \(waited 1 s; mount it"):
        wait_for_mounts(dirs, stop, said.append, 1.0, fstab, mountinfo)
    assert time.monotonic() - t0 >= 1.0
    assert said == [f"waiting up to 1 s for the mount: {unmounted_paths(dirs, fstab, mountinfo)}"]

    threading.Timer(0.3, stop.set).start()
    assert wait_for_mounts(dirs, stop, said.append, 30.0, fstab, mountinfo) is False

    def mount() -> None:
        mountinfo.write_text(mountinfo.read_text() + f"23 22 8:17 / {point} rw - ext4 x rw\n")

    threading.Timer(0.3, mount).start()
    assert wait_for_mounts(dirs, threading.Event(), said.append, 30.0, fstab, mountinfo)


# Each step is killed after 120 s (exit 137): a hang says which step it was (CI once saw the
# whole scene hang: a SIGTERM that deadlocked the daemon in its own signal handler).
SCENE = r"""
set -u
mount --make-rprivate /
mount --bind "$FSTAB" /etc/fstab
PY="timeout -s KILL 120 $PY"
$PY -m meraudiod analyze "$DEMO" > /dev/null 2> "$OUT/analyze.err"; echo "analyze rc=$?"
$PY -m meraudiod run --source demo 2> "$OUT/stopped.err" &
pid=$!
for i in $(seq 600); do grep -q "waiting up to" "$OUT/stopped.err" && break; sleep 0.1; done
kill -TERM $pid; wait $pid; echo "stopped rc=$?"
$PY -m meraudiod run --source demo 2> "$OUT/run.err" &
pid=$!
for i in $(seq 600); do grep -q "waiting up to" "$OUT/run.err" && break; sleep 0.1; done
sleep 1
mount -t tmpfs -o size=512m tmpfs "$POINT"
wait $pid; echo "run rc=$?"
echo "audio files: $(find "$POINT/meraudiod/audio" -name '*.flac' | wc -l)"
$PY -m meraudiod recordings list > "$OUT/list.out" 2>&1; echo "list rc=$?"
umount "$POINT"
echo "beneath: $(ls -A "$POINT" | wc -l)"
"""


@needs_root
def test_a_disk_not_mounted_yet_is_waited_for_and_nothing_lands_beneath(
    tmp_path: Path, env: dict[str, str]
) -> None:
    point = tmp_path / "usb disk"  # a space: fstab writes it \040
    point.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    escaped = str(point).replace(" ", "\\040")
    fstab = write(tmp_path / "fstab", f"LABEL=NOSUCH {escaped} ext4 defaults,nofail 0 2\n")
    scene_env = {
        **env,
        "MERAUDIOD_STORAGE__DATA_DIR": str(point / "meraudiod"),
        "PY": sys.executable,
        "DEMO": str(DEMO),
        "FSTAB": str(fstab),
        "POINT": str(point),
        "OUT": str(out),
    }
    done = subprocess.run(
        ["unshare", "--mount", "bash", "-c", SCENE],
        env=scene_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = done.stdout.splitlines()
    not_mounted = (
        f"storage.data_dir: {point / 'meraudiod'} is on {point}, which /etc/fstab lists but"
        " nothing is mounted on"
    )
    # A command refuses at once, in one line, and creates nothing.
    assert "analyze rc=1" in lines, done.stdout + done.stderr
    assert (out / "analyze.err").read_text() == f"Error: {not_mounted}\n"
    # The daemon waits, saying why; stopped while waiting, it ends cleanly.
    assert "stopped rc=0" in lines, (out / "stopped.err").read_text()
    assert f"waiting up to 60 s for the mount: {not_mounted}" in (out / "stopped.err").read_text()
    # Mounted while it waits, it goes on and records onto the disk.
    assert "run rc=0" in lines, (out / "run.err").read_text()
    assert "audio files: 5" in lines, done.stdout
    assert "list rc=0" in lines and (out / "list.out").read_text().count("\n") >= 5
    # Beneath the mount point nothing was ever written.
    assert "beneath: 0" in lines, done.stdout
    assert not any(point.iterdir())


@needs_root
def test_config_check_says_the_disk_is_not_mounted(tmp_path: Path, env: dict[str, str]) -> None:
    point = tmp_path / "usb"
    point.mkdir()
    fstab = write(tmp_path / "fstab", f"LABEL=NOSUCH {point} ext4 defaults,nofail 0 2\n")
    script = 'mount --make-rprivate / && mount --bind "$FSTAB" /etc/fstab && exec "$@"'
    command = [sys.executable, "-m", "meraudiod", "config", "check"]
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "sh", *command],
        env={**env, "MERAUDIOD_STORAGE__DATA_DIR": str(point / "m"), "FSTAB": str(fstab)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr == (
        f"Error: storage.data_dir: {point / 'm'} is on {point}, which /etc/fstab lists but"
        " nothing is mounted on\n"
    )
    assert not any(point.iterdir())


def in_a_mount_namespace(
    script: str, env: dict[str, str], fstab: Path, **values: Path
) -> list[str]:
    """Run a bash script in a mount namespace of its own with `fstab` as /etc/fstab; $PY is
    this Python, $DEMO the demo recording, and each of `values` a variable. Its output lines."""
    preamble = 'set -u\nmount --make-rprivate /\nmount --bind "$FSTAB" /etc/fstab\n'
    done = subprocess.run(
        ["unshare", "--mount", "bash", "-c", preamble + script],
        env={
            **env,
            "PY": sys.executable,
            "DEMO": str(DEMO),
            "FSTAB": str(fstab),
            **{k: str(v) for k, v in values.items()},
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert not done.stderr.strip() or "rc=" in done.stdout, done.stderr
    return done.stdout.splitlines()


@needs_root
def test_a_mount_point_fstab_names_through_a_symlink_is_checked(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """/media/usb -> /mnt/usb in fstab: the kernel mounts on (and mountinfo names) /mnt/usb.
    Before, a data directory under it was not checked: analyze wrote beneath the mount
    point."""
    target = tmp_path / "mnt" / "usb"
    target.mkdir(parents=True)
    link = tmp_path / "media-usb"
    link.symlink_to(target)
    fstab = write(tmp_path / "fstab", f"LABEL=usb {link}/ ext4 defaults,nofail 0 2\n")
    script = (
        '"$PY" -m meraudiod analyze "$DEMO" > /dev/null 2> "$ERR"; echo "unmounted rc=$?"\n'
        'echo "beneath: $(ls -A "$TARGET" | wc -l)"\n'
        'mount -t tmpfs -o size=64m tmpfs "$LINK"\n'
        '"$PY" -m meraudiod analyze "$DEMO" > /dev/null 2>&1; echo "mounted rc=$?"\n'
        'echo "on the disk: $(ls "$TARGET/meraudiod")"\n'
    )
    err = tmp_path / "analyze.err"
    env = {**env, "MERAUDIOD_STORAGE__DATA_DIR": str(target / "meraudiod")}
    lines = in_a_mount_namespace(script, env, fstab, TARGET=target, LINK=link, ERR=err)
    assert "unmounted rc=1" in lines, err.read_text()
    assert err.read_text() == (
        f"Error: storage.data_dir: {target / 'meraudiod'} is on {link}, which /etc/fstab"
        " lists but nothing is mounted on\n"
    )
    assert "beneath: 0" in lines
    assert "mounted rc=0" in lines
    assert "on the disk: audio meraudiod.db" in " ".join(lines), lines
    assert not any(target.iterdir())  # the tmpfs is gone with the namespace


@needs_root
def test_bench_refuses_a_data_directory_whose_disk_is_not_mounted(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """bench runs its daemons in scratch directories inside the data directory. Before, it
    made them beneath the mount point and its daemons waited 60 s each: a traceback after a
    minute, and the data directory left on the SD card."""
    point = tmp_path / "usb"
    point.mkdir()
    fstab = write(tmp_path / "fstab", f"LABEL=usb {point} ext4 defaults,nofail 0 2\n")
    err = tmp_path / "bench.err"
    script = '"$PY" -m meraudiod bench --only listening > /dev/null 2> "$ERR"; echo "rc=$?"\n'
    env = {**env, "MERAUDIOD_STORAGE__DATA_DIR": str(point / "meraudiod")}
    lines = in_a_mount_namespace(script, env, fstab, ERR=err)
    assert "rc=1" in lines
    assert err.read_text() == (
        f"Error: storage.data_dir: {point / 'meraudiod'} is on {point}, which /etc/fstab lists"
        " but nothing is mounted on\n"
    )
    assert not any(point.iterdir())


def test_a_storage_directory_under_home_is_where_the_mount_check_looks(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """data_dir = "~/usb/meraudiod": the mount check looked at $HOME/usb, but analyze and
    the daemon wrote to a directory named "~" in the current directory (under systemd, /~),
    on the SD card, with the disk mounted at $HOME/usb unused."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    env = {**env, "HOME": str(home), "MERAUDIOD_STORAGE__DATA_DIR": "~/usb/meraudiod"}
    done = cli("analyze", str(DEMO), env=env, timeout_s=300, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert (home / "usb" / "meraudiod" / "meraudiod.db").is_file()
    assert not any(cwd.iterdir())


def test_a_symlink_loop_in_fstab_is_no_traceback(tmp_path: Path, env: dict[str, str]) -> None:
    """An fstab entry whose mount point is a symlink loop (a broken entry for another disk)
    must not break every command: it is taken as listed, and cannot hold the data."""
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "back")
    (tmp_path / "back").symlink_to(loop)
    fstab = write(tmp_path / "fstab", f"LABEL=old {loop}/usb ext4 noauto 0 0\n")
    mountinfo = write(tmp_path / "mountinfo", "22 1 8:2 / / rw - ext4 /dev/sda2 rw\n")
    assert missing_mount(Path("/var/lib/meraudiod"), fstab, mountinfo) is None
    assert missing_mount(loop / "usb" / "meraudiod", fstab, mountinfo) == loop / "usb"


@needs_root
def test_a_token_file_on_a_disk_not_mounted_yet_is_waited_for(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """http.token_file and mqtt.password_file on a disk fstab lists, not mounted yet. Before,
    the daemon read the token at once and exited 78, a configuration error systemd does not
    restart, though the disk was coming; `mqtt test` said it could not read the password.
    Now the daemon waits for that disk as for the storage's (not for MQTT's file: MQTT is
    off) and reads the token once it is mounted; the commands that read the files refuse,
    naming the mount."""
    point, stage = tmp_path / "keys", tmp_path / "stage"
    point.mkdir()
    stage.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    fstab = write(tmp_path / "fstab", f"LABEL=keys {point} ext4 defaults,nofail 0 2\n")
    script = (
        '"$PY" -m meraudiod mqtt test > /dev/null 2> "$OUT/mqtt.err"; echo "mqtt rc=$?"\n'
        '"$PY" -m meraudiod config check > /dev/null 2> "$OUT/check.err"; echo "check rc=$?"\n'
        '$PY -m meraudiod run --source demo 2> "$OUT/run.err" &\n'
        "pid=$!\n"
        "for i in $(seq 600); do\n"
        '  grep -q "waiting up to" "$OUT/run.err" && break; kill -0 $pid || break; sleep 0.1\n'
        "done\n"
        # The disk comes with the token on it (prepared aside: no half-written token is read).
        'mount -t tmpfs -o size=1m tmpfs "$STAGE" && echo secret > "$STAGE/token"\n'
        'mount --move "$STAGE" "$POINT"\n'
        'wait $pid; echo "run rc=$?"\n'
    )
    env = {
        **env,
        "MERAUDIOD_HTTP__ENABLED": "true",
        "MERAUDIOD_HTTP__PORT": str(free_port()),
        "MERAUDIOD_HTTP__TOKEN_FILE": str(point / "token"),
        "MERAUDIOD_MQTT__USERNAME": "meraudiod",
        "MERAUDIOD_MQTT__PASSWORD_FILE": str(point / "password"),
    }
    lines = in_a_mount_namespace(script, env, fstab, OUT=out, POINT=point, STAGE=stage)
    not_mounted = "is on {point}, which /etc/fstab lists but nothing is mounted on".format
    password = f"mqtt.password_file: {point / 'password'} {not_mounted(point=point)}"
    assert "mqtt rc=1" in lines, lines
    assert (out / "mqtt.err").read_text() == f"Error: {password}\n"
    assert "check rc=1" in lines
    assert (out / "check.err").read_text() == f"Error: {password}\n"
    run = (out / "run.err").read_text()
    assert "run rc=0" in lines, run
    token = f"http.token_file: {point / 'token'} {not_mounted(point=point)}"
    assert f"waiting up to 60 s for the mount: {token}\n" in run, run
    assert "http: serving on" in run, run
    assert not any(point.iterdir())  # nothing was written beneath


@needs_root
def test_a_command_checks_the_disks_it_uses_only(tmp_path: Path, env: dict[str, str]) -> None:
    """`models install` writes only the models directory, `recordings list` reads only the
    database. Before, each refused while any storage directory's disk was not mounted:
    models install while only the data directory's was, recordings list while only the
    models'. A command still refuses for a disk it writes (recordings delete, the audio's)."""
    point = tmp_path / "usb"
    point.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    fstab = write(tmp_path / "fstab", f"LABEL=usb {point} ext4 defaults,nofail 0 2\n")
    open_db(Path(env["MERAUDIOD_STORAGE__DATA_DIR"]) / "meraudiod.db").close()
    rec_id = "01M8MR3XAKN63F9GEACZWP64Z0"
    script = (
        'MERAUDIOD_STORAGE__DATA_DIR="$POINT/m" "$PY" -m meraudiod models install'
        ' silero-vad-v6 > "$OUT/install.out" 2>&1; echo "install rc=$?"\n'
        'MERAUDIOD_STORAGE__MODELS_DIR="$POINT/models" $PY -m meraudiod recordings list'
        ' > "$OUT/list.out" 2>&1; echo "list rc=$?"\n'
        'MERAUDIOD_STORAGE__MODELS_DIR="$POINT/models" "$PY" -m meraudiod models install'
        ' silero-vad-v6 2> "$OUT/models.err"; echo "models rc=$?"\n'
        'MERAUDIOD_STORAGE__TMP_AUDIO_DIR="$POINT/audio" "$PY" -m meraudiod recordings delete'
        f' {rec_id} 2> "$OUT/delete.err"; echo "delete rc=$?"\n'
    )
    lines = in_a_mount_namespace(script, env, fstab, POINT=point, OUT=out)
    assert "install rc=0" in lines, (out / "install.out").read_text()
    assert (out / "install.out").read_text().startswith("silero-vad-v6: ")
    assert "list rc=0" in lines, (out / "list.out").read_text()
    not_mounted = f"is on {point}, which /etc/fstab lists but nothing is mounted on"
    assert "models rc=1" in lines
    models = f"storage.models_dir: {point / 'models'} {not_mounted}"
    assert (out / "models.err").read_text() == f"Error: {models}\n"
    assert "delete rc=1" in lines
    audio = f"storage.tmp_audio_dir: {point / 'audio'} {not_mounted}"
    assert (out / "delete.err").read_text() == f"Error: {audio}\n"
    assert not any(point.iterdir())
