"""Two hosts on one machine: network namespaces, one sshd each, ``deepspeed --hostfile``.

The fixture ``two_hosts`` builds what a 2-node cluster gives the launcher, inside this machine:

- network namespaces ``smae-h1-PID`` and ``smae-h2-PID``, joined by one veth pair whose ends are
  both named ``smae0`` (one ``GLOO_SOCKET_IFNAME`` fits both hosts), ``10.213.7.1/24`` and
  ``10.213.7.2/24`` assigned inside the namespaces only, ``lo`` up in each, no route out; nothing
  is added to the root namespace;
- in each namespace ``/usr/sbin/sshd -D`` with a test config: listening on its own address
  only, a host key, ``authorized_keys`` and pid file generated under ``tmp_path``, root by key only,
  ``UsePAM no``, ``StrictModes no``;
- the client side: a generated key, a ``known_hosts`` naming the two host keys, and an ``ssh``
  wrapper (first on the launcher's ``PATH``) that runs ``ssh -F <test config>``, so DeepSpeed's
  ssh check and ``pdsh -R ssh`` reach exactly these two addresses without prompts, and
  ``~/.ssh`` is never read or changed;
- a hostfile (``10.213.7.1 slots=1``, ``10.213.7.2 slots=1``) and a ``DS_ENV_FILE`` that exports
  ``DS_ACCELERATOR=cpu``, this process's ``PATH`` (the same ``ninja`` as the single-host launches,
  so the cached shm op is not rebuilt) and ``GLOO_SOCKET_IFNAME=smae0`` to the remote shells.

The launcher runs inside namespace 1 (``ip netns exec``), so both ranks are started over ssh
on the veth, one CPU rank per host. Teardown SIGKILLs every process left in the namespaces
(``ip netns pids``: sshd, launcher, ranks, all started here) and deletes the namespaces, also
after a failure.

The test trains the demo model (4 steps, checkpoints at 2 and 4, ZeRO-2, like
``tests/launch.py::pretrain``), SIGKILLs the rank in namespace 2 as soon as ``step_00000002``
is COMPLETE, relaunches through the same hostfile with ``--resume auto`` and checks the
outcome against the session's uninterrupted single-host 2-rank run (``straight_run``).

Found here and fixed in the pipeline: the killed rank's DALI worker processes survived it and
kept host 2's ssh session (and so pdsh and ``deepspeed``) open for good; the workers now die
with their rank, and the test requires that nothing of the killed rank is left
(``kill_host2_rank``).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from selectivemae_ds import checkpoint
from tests.launch import BIN, DEMO, DEMO_SETS, REPO, assert_same_weights, fp32_weights, set_args
from tests.reliability.faults import logged_steps, records

DS_JSON = "zero2.json"
TARGET = 4  # DEMO_SETS' train.steps and checkpoint.every_steps
EVERY = 2
assert f"train.steps={TARGET}" in DEMO_SETS and f"checkpoint.every_steps={EVERY}" in DEMO_SETS
IFNAME = "smae0"
ADDRS = ("10.213.7.1", "10.213.7.2")
PREFIX = 24
SSH_PORT = 22
SSHD = "/usr/sbin/sshd"


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)


def _check(*cmd: str) -> None:
    r = _run(*cmd)
    assert r.returncode == 0, f"{' '.join(cmd)}: rc {r.returncode}: {r.stderr.strip()}"


def unavailable() -> str | None:
    """Why two namespaced hosts cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (ip netns, sshd)"
    missing = [tool for tool in ("ip", "pdsh", "ssh", "ssh-keygen") if shutil.which(tool) is None]
    if not os.access(SSHD, os.X_OK):
        missing.append(SSHD)
    if missing:
        return f"missing {', '.join(missing)} (apt-get install openssh-server pdsh; .ci/run does)"
    probe = f"smae-probe-{os.getpid()}"
    r = _run("ip", "netns", "add", probe)
    if r.returncode != 0:
        return f"ip netns add is not permitted here: {r.stderr.strip()}"
    _check("ip", "netns", "del", probe)
    return None


def netns_pids(ns: str) -> list[int]:
    r = _run("ip", "netns", "pids", ns)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _kill_all(ns: str, keep: Callable[[int], bool] = lambda pid: False) -> None:
    """SIGKILL every process in namespace ``ns`` (all started by this test) except ``keep`` ones;
    wait until they are gone."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pids = [p for p in netns_pids(ns) if not keep(p)]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        time.sleep(0.1)
    raise AssertionError(f"processes in {ns} survived SIGKILL: {netns_pids(ns)}")


@dataclass
class Hosts:
    """Two namespaced hosts with sshd, and how to launch ``deepspeed --hostfile`` on them."""

    namespaces: tuple[str, str]
    root: Path
    hostfile: Path
    env: dict[str, str]
    sshd_pids: tuple[int, int]

    def launch(self, run_dir: Path, data: Path, port: int, *extra: str) -> subprocess.Popen:
        """``deepspeed --hostfile`` from namespace 1 with ``tests/launch.py::pretrain``'s arguments;
        output goes to ``run_dir.log``."""
        cmd = ["ip", "netns", "exec", self.namespaces[0], str(BIN / "deepspeed"), "--hostfile", str(self.hostfile),
               "--master_addr", ADDRS[0], "--master_port", str(port), str(REPO / "launcher" / "pretrain.py"),
               "--config", str(DEMO), "--deepspeed_config", str(REPO / "ds_configs" / DS_JSON),
               "--set", f"data.path={data}", "--set", f"run_dir={run_dir}", *set_args(DEMO_SETS), *extra]
        log = open(run_dir.parent / f"{run_dir.name}-{port}.log", "w")
        try:
            return subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            log.close()

    def rank_pid(self, host: int, run_dir: Path) -> int | None:
        """The trainer process of ``run_dir`` in namespace ``host`` (one rank per host: local rank 0)."""
        for pid in netns_pids(self.namespaces[host]):
            args = _cmdline(pid)
            if b"--local_rank=0" in args and f"run_dir={run_dir}".encode() in args:
                return pid
        return None

    def stop_jobs(self) -> None:
        """SIGKILL everything in both namespaces except the sshds."""
        for ns in self.namespaces:
            _kill_all(ns, keep=lambda pid: pid in self.sshd_pids)


def _sshd_config(root: Path, i: int) -> Path:
    conf = root / f"sshd{i}.conf"
    conf.write_text("\n".join([
        f"ListenAddress {ADDRS[i]}:{SSH_PORT}",
        f"HostKey {root / f'host{i}_ed25519'}",
        f"AuthorizedKeysFile {root / 'authorized_keys'}",
        f"PidFile {root / f'sshd{i}.pid'}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "X11Forwarding no",
        "LogLevel ERROR",
        "",
    ]))
    return conf


def _client(root: Path) -> Path:
    """An ``ssh`` wrapper directory: ``ssh -F`` a config with the test key and known hosts."""
    config = root / "ssh_config"
    config.write_text("\n".join([
        f"Host {' '.join(ADDRS)}",
        f"  Port {SSH_PORT}",
        "  User root",
        f"  IdentityFile {root / 'client_ed25519'}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {root / 'known_hosts'}",
        "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes",
        "  BatchMode yes",
        "  ConnectTimeout 10",
        "",
    ]))
    bindir = root / "bin"
    bindir.mkdir()
    wrapper = bindir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {config} "$@"\n')
    wrapper.chmod(0o755)
    return bindir


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[Hosts]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"two namespaced hosts unavailable: {reason}")
    root = tmp_path / "hosts"
    root.mkdir()
    namespaces = (f"smae-h1-{os.getpid()}", f"smae-h2-{os.getpid()}")
    privsep = Path("/run/sshd")
    made_privsep = not privsep.exists()
    sshds: list[subprocess.Popen] = []
    created: list[str] = []
    try:
        if made_privsep:
            privsep.mkdir(mode=0o755)
        for ns in namespaces:
            _check("ip", "netns", "add", ns)
            created.append(ns)
            _check("ip", "-n", ns, "link", "set", "lo", "up")
        _check("ip", "-n", namespaces[0], "link", "add", IFNAME, "type", "veth", "peer", "name", IFNAME,
               "netns", namespaces[1])
        for ns, addr in zip(namespaces, ADDRS):
            _check("ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX}", "dev", IFNAME)
            _check("ip", "-n", ns, "link", "set", IFNAME, "up")

        _check("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "smae-test-client", "-f",
               str(root / "client_ed25519"))
        shutil.copy(root / "client_ed25519.pub", root / "authorized_keys")
        known = []
        for i, (ns, addr) in enumerate(zip(namespaces, ADDRS)):
            key = root / f"host{i}_ed25519"
            _check("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"smae-test-host{i}", "-f", str(key))
            kind, blob = Path(f"{key}.pub").read_text().split()[:2]
            known.append(f"{addr} {kind} {blob}\n")
            log = open(root / f"sshd{i}.log", "w")
            try:
                sshds.append(subprocess.Popen(["ip", "netns", "exec", ns, SSHD, "-D", "-e", "-f",
                                               str(_sshd_config(root, i))], stdout=log, stderr=subprocess.STDOUT))
            finally:
                log.close()
        (root / "known_hosts").write_text("".join(known))
        bindir = _client(root)

        ds_env = root / "deepspeed_env"
        ds_env.write_text(f"DS_ACCELERATOR=cpu\nPATH={os.environ['PATH']}\nGLOO_SOCKET_IFNAME={IFNAME}\n")
        hostfile = root / "hostfile"
        hostfile.write_text("".join(f"{addr} slots=1\n" for addr in ADDRS))
        env = dict(os.environ, DS_ACCELERATOR="cpu", DS_ENV_FILE=str(ds_env), GLOO_SOCKET_IFNAME=IFNAME,
                   PATH=f"{bindir}:{os.environ['PATH']}")
        hosts = Hosts(namespaces, root, hostfile, env, (sshds[0].pid, sshds[1].pid))

        deadline = time.monotonic() + 30
        for i, addr in enumerate(ADDRS):
            while True:
                r = subprocess.run(["ip", "netns", "exec", namespaces[0], str(bindir / "ssh"), addr, "hostname"],
                                   capture_output=True, text=True, timeout=30)
                if r.returncode == 0:
                    break
                assert sshds[i].poll() is None, f"sshd {i} exited: {(root / f'sshd{i}.log').read_text()}"
                assert time.monotonic() < deadline, f"ssh to {addr} failed: {r.stderr.strip()}"
                time.sleep(0.2)
        yield hosts
    finally:
        for ns in created:
            _kill_all(ns)
        for proc in sshds:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=20)
        for ns in created:
            _check("ip", "netns", "del", ns)
        if made_privsep and privsep.is_dir():
            privsep.rmdir()


def _resume_records(run: Path) -> tuple[dict, dict[int, float]]:
    """The last resume event and the losses logged after it (step -> loss)."""
    recs = records(run)
    last = max(i for i, r in enumerate(recs) if r.get("event") == "resume")
    losses = {r["step"]: r["loss"] for r in recs[last + 1:] if "event" not in r}
    return recs[last], losses


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (``/proc/PID/task/*/children``, recursively)."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            todo += [k for k in kids if k not in out]
            out.update(kids)
    return out


def _launch_pids(hosts: Hosts) -> list[int]:
    """``python -m deepspeed.launcher.launch`` processes (one per host) still running (not pdsh or ssh,
    whose arguments carry the same words)."""
    pids = []
    for pid in (p for ns in hosts.namespaces for p in netns_pids(ns)):
        args = _cmdline(pid)
        if args and Path(args[0].decode()).name.startswith("python") and b"deepspeed.launcher.launch" in args:
            pids.append(pid)
    return pids


@dataclass
class Kill:
    """What the kill of host 2's rank observed."""

    steps: list[int]
    complete: list[str]
    orphans: list[str]
    launcher_rc: int


def kill_host2_rank(hosts: Hosts, run: Path, data: Path, port: int) -> Kill:
    """Launch on both hosts, SIGKILL host 2's rank once step ``EVERY``'s checkpoint is COMPLETE,
    wait until both hosts' ``launch.py`` have exited, then for the launcher (pdsh) to return.

    Processes of the killed rank that outlive it would hold host 2's ssh session open, so pdsh
    and ``deepspeed`` would never return; after a short grace they are SIGKILLed as a node
    cleanup would, and named in ``Kill.orphans`` (the test requires none). Any other process
    left behind fails the test."""
    ckpts = run / "checkpoints"
    proc = hosts.launch(run, data, port)
    log = run.parent / f"{run.name}-{port}.log"
    try:
        victim: int | None = None
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if victim is None:
                victim = hosts.rank_pid(1, run)
            if victim is not None and checkpoint.is_complete(ckpts / checkpoint.tag_for(EVERY)):
                break
            time.sleep(0.01)
        assert victim is not None and proc.poll() is None, f"nothing to kill on host 2:\n{log.read_text()[-3000:]}"
        children = _descendants(victim)
        os.kill(victim, signal.SIGKILL)
        steps, complete = logged_steps(run), [p.name for p in checkpoint.list_complete(ckpts)]

        deadline = time.monotonic() + 120
        while _launch_pids(hosts) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _launch_pids(hosts), f"launch.py still running 120 s after the kill:\n{log.read_text()[-3000:]}"
        orphans: list[str] = []
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            left = [p for p in netns_pids(hosts.namespaces[1])
                    if p not in hosts.sshd_pids and not (_cmdline(p) or [b""])[0].startswith(b"sshd")]
            assert set(left) <= children, f"left on host 2 besides the killed rank's children: " \
                f"{[_cmdline(p) for p in left if p not in children]}"
            orphans = [b" ".join(_cmdline(p)).decode()[:120] for p in left]
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
            proc.wait(timeout=30)
        assert proc.returncode is not None
        return Kill(steps, complete, orphans, proc.returncode)
    finally:
        hosts.stop_jobs()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)


@pytest.mark.slow
def test_kill_one_host_rank_then_resume_over_ssh(tmp_path: Path, two_hosts: Hosts, launch_dataset: Path,
                                                  straight_run: Callable[[str], Path]) -> None:
    straight = straight_run(DS_JSON)
    run = tmp_path / "run"
    run.mkdir()
    k = kill_host2_rank(two_hosts, run, launch_dataset, 29500)
    log = (run.parent / "run-29500.log").read_text()
    assert f"{ADDRS[1]}: " in log and f"{ADDRS[0]}: " in log, "pdsh did not start both hosts"
    assert re.search(rf"gloo/transport/tcp/pair\.cc:\d+\].*\[{re.escape(ADDRS[1])}\]:\d+", log), \
        "rank 0 did not see host 2's rank go (a gloo error naming its veth address)"
    assert k.complete == [checkpoint.tag_for(EVERY)], f"complete at the kill: {k}"
    assert k.launcher_rc != 0, "the launcher reported success after a rank was killed"
    # The pipeline's workers die with their rank (PR_SET_PDEATHSIG); before that fix they held
    # host 2's ssh session, and so pdsh and the launcher, open indefinitely.
    assert not k.orphans, f"host 2 kept {len(k.orphans)} processes of the killed rank that held its ssh " \
        f"session and the launcher open until killed: {k.orphans}"

    second = two_hosts.launch(run, launch_dataset, 29501, "--resume", "auto")
    try:
        rc = second.wait(timeout=300)
    finally:
        two_hosts.stop_jobs()
    assert rc == 0, (run.parent / "run-29501.log").read_text()[-4000:]

    resume, losses = _resume_records(run)
    assert Path(resume["from"]).name in k.complete, f"resumed from {resume} ({k})"
    assert resume["step"] == EVERY and max(k.steps) - resume["step"] <= EVERY, f"{resume} ({k})"
    final = run / "checkpoints" / checkpoint.tag_for(TARGET)
    assert checkpoint.is_complete(final), "the relaunch did not reach a complete step-4 checkpoint"
    assert sorted(losses) == [3, 4] and all(math.isfinite(v) for v in losses.values()), losses
    state = json.loads((final / checkpoint.CLIENT_STATE).read_text())
    assert state["step"] == TARGET and state["world_size"] == 2 and resume["world_size"] == 2, state
    assert_same_weights(fp32_weights(straight / "checkpoints" / checkpoint.tag_for(TARGET)), fp32_weights(final))
