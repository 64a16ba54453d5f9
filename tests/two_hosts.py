"""Two hosts on one machine: network namespaces joined by a veth pair.

Each namespace has only its loopback and one end of the pair, with an address in a private
/24 used nowhere else, so every byte between the "hosts" crosses a real TCP link and nothing
can leave the machine. `TwoHosts.close()` kills what was started and deletes the namespaces;
the pytest fixture calls it also when a test fails.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import REPO, kill_pids, subprocess_env


class NamespacesUnavailable(RuntimeError):
    """This machine (or user) cannot create network namespaces."""


@dataclass(frozen=True)
class Host:
    namespace: str
    interface: str
    address: str


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise NamespacesUnavailable(f"'ip {' '.join(args)}' failed: {result.stderr.strip()}")


@dataclass
class TwoHosts:
    hosts: tuple[Host, Host]
    processes: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def create(cls, tag: str, subnet: int) -> "TwoHosts":
        """Namespaces dd<tag>a/b with 10.<subnet>.0.1 and .2 on a veth pair (subnet < 256)."""
        hosts = tuple(Host(f"dd{tag}{side}", f"v{tag}{side}", f"10.{subnet}.0.{n}")
                      for n, side in ((1, "a"), (2, "b")))
        pair = cls(hosts)
        try:
            for host in hosts:
                _ip("netns", "add", host.namespace)
            _ip("link", "add", hosts[0].interface, "type", "veth", "peer", "name",
                hosts[1].interface)
            for host in hosts:
                _ip("link", "set", host.interface, "netns", host.namespace)
                pair.exec_ip(host, "addr", "add", f"{host.address}/24", "dev", host.interface)
                pair.exec_ip(host, "link", "set", host.interface, "up")
                pair.exec_ip(host, "link", "set", "lo", "up")
        except NamespacesUnavailable:
            pair.close()
            raise
        return pair

    def exec_ip(self, host: Host, *args: str) -> None:
        _ip("netns", "exec", host.namespace, "ip", *args)

    def start(self, host: Host, args: list[str], cwd: Path = REPO, env: dict | None = None,
              log: Path | None = None) -> subprocess.Popen:
        """Run `python args...` inside the host's namespace, in its own process group."""
        environment = {**subprocess_env(), "GLOO_SOCKET_IFNAME": host.interface, **(env or {})}
        out = open(log, "w") if log else subprocess.DEVNULL
        process = subprocess.Popen(
            ["ip", "netns", "exec", host.namespace, sys.executable, *args], cwd=cwd,
            env=environment, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def torchrun(self, host: Host, torchrun_args: list[str], train_args: list[str],
                 cwd: Path = REPO, log: Path | None = None) -> subprocess.Popen:
        return self.start(host, ["-m", "torch.distributed.run", *torchrun_args,
                                 "-m", "dino_dist.train", *train_args], cwd=cwd, log=log)

    def kill_host(self, host: Host) -> None:
        """SIGKILL every process of the host (torchrun puts its workers in sessions of their
        own, so a process group would miss them; the namespace does not)."""
        pids = subprocess.run(["ip", "netns", "pids", host.namespace], capture_output=True,
                              text=True).stdout.split()
        kill_pids(pids)
        for process in self.processes:
            if process.args[3] == host.namespace:
                process.wait()

    def close(self) -> None:
        for host in self.hosts:
            self.kill_host(host)
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        # A pair that was never moved into a namespace would stay in the root one.
        subprocess.run(["ip", "link", "del", self.hosts[0].interface], capture_output=True)
