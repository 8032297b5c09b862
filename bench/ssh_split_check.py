"""The README's split flow against a real SSH remote: Debian's openssh-server on 127.0.0.1 and dvc-ssh.

    apt-get install openssh-server                      # once (the check starts its own sshd, as root)
    pip install --target /tmp/dvcssh dvc-ssh            # or into the venv; not a dependency of the project
    PYTHONPATH=/tmp/dvcssh:. .venv/bin/python bench/ssh_split_check.py

Two workers each reproduce one category of the tiny project (tests/test_pipeline.py's) and push the
run cache to ssh://root@127.0.0.1:<port>/<folder>; an assembler pulls it and `dvc repro --pull`
restores every per-category stage. Prints the stages each one ran and exits 1 if the assembler ran
anything but the cross-category ones. tests/test_pipeline.py runs the same flow on a local folder.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_pipeline import dvc, git, make_project, ran, set_param  # noqa: E402

CROSS_CATEGORY = {"compare", "report", "summary_figure", "plots_page"}


def start_sshd(folder: Path, port: int) -> subprocess.Popen:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "user_key")], check=True)
    shutil.copy(folder / "user_key.pub", folder / "authorized_keys")
    Path("/run/sshd").mkdir(exist_ok=True)
    sshd = subprocess.Popen(
        [
            "/usr/sbin/sshd",
            "-D",
            "-e",
            "-p",
            str(port),
            "-h",
            str(folder / "host_key"),
            "-o",
            "ListenAddress=127.0.0.1",
            "-o",
            f"AuthorizedKeysFile={folder / 'authorized_keys'}",
            "-o",
            "PasswordAuthentication=no",
            "-o",
            "StrictModes=no",
            "-o",
            f"PidFile={folder / 'sshd.pid'}",
        ]
    )
    time.sleep(1.0)
    known = subprocess.run(["ssh-keyscan", "-p", str(port), "127.0.0.1"], capture_output=True, text=True, check=True)
    ssh_dir = Path.home() / ".ssh"
    ssh_dir.mkdir(exist_ok=True)
    with open(ssh_dir / "known_hosts", "a") as fh:
        fh.write(known.stdout)
    return sshd


def main() -> None:
    port = 2222
    with tempfile.TemporaryDirectory(prefix="ssh-split-") as scratch:
        scratch = Path(scratch)
        sshd = start_sshd(scratch, port)
        try:
            url = f"ssh://root@127.0.0.1:{port}{scratch / 'remote'}"
            origin = make_project(scratch / "origin")
            set_param(origin, "data.categories", ["carpet", "tile"])
            dvc(origin, "remote", "add", "-d", "shared", url)
            dvc(origin, "remote", "modify", "shared", "keyfile", str(scratch / "user_key"))
            git(origin, "add", "-A")
            git(origin, "commit", "-qm", "two categories, an ssh remote")
            ran_by = {}
            for worker, category in (("a", "carpet"), ("b", "tile")):
                git(scratch, "clone", "-q", str(origin), str(scratch / worker))
                ran_by[worker] = ran(dvc(scratch / worker, "repro", "--glob", f"*@{category}", f"*@{category}-*"))
                dvc(scratch / worker, "push", "--run-cache")
                print(f"worker {worker}: reproduced {len(ran_by[worker])} stages of {category}, pushed to {url}")
            git(scratch, "clone", "-q", str(origin), str(scratch / "c"))
            dvc(scratch / "c", "pull", "--run-cache", "--allow-missing")
            output = dvc(scratch / "c", "repro", "--pull")
            assembled = ran(output)
            restored = output.count("is cached - skipping run")
            print(f"assembler: ran {sorted(assembled)}, restored {restored} stages from the run cache")
            if not assembled <= CROSS_CATEGORY:
                sys.exit(f"the assembler reran per-category stages: {sorted(assembled - CROSS_CATEGORY)}")
        finally:
            sshd.terminate()
            sshd.wait(timeout=10)


if __name__ == "__main__":
    main()
