"""The README's examples, run as written against a fresh `make run` (issue 17).

Which blocks run (the one convention; README.md says it too, in a comment at the top of "Try it"):

- A fenced block is runnable when the line right above its opening fence is exactly `<!-- run -->`.
  Its info string must be `sh` (bash) or `python`: a mark on any other block, or a mark that no fence
  follows, fails the test. Blocks without the mark (configuration fragments, `make run`, sample
  output) are never run; nothing here lists blocks.
- All runnable blocks run in document order in one bash session started with `set -euo pipefail`,
  from the repository's folder, as a reader pasting them into one terminal would: a `sh` block as it
  is; a `python` block fed on stdin to the project's Python (`"$README_PYTHON" - <<'EOF'`), so it sees
  what the blocks before it exported (`export BASE A_TOKEN`). A block may start a background process
  (a receiver): the session runs in a process group of its own, killed once it ends.
- Any non-zero exit fails the test; so does a block that prints nothing (each step says what
  happened) and a transcript that shows a JWT (the steps print lines for people, not token dumps).

The stack is `python -m deploy.local.run`, the module `make run` runs, with its defaults but for
where it listens and keeps things: `PORT`, `RUN_AUTH_PORT`, `RUN_REFERRAL_PORT` (free ports),
`RUN_DATA_DIR` (a temporary folder: the embedded mail server's `.eml` files, the dev signing key,
nginx's files), `DATABASE_URL` (a fresh database on the test server, dropped afterwards) and the
services' Redis key prefixes (the run's own, deleted afterwards) on `REDIS_URL`. The session gets
`BASE` and `MAIL_DIR` pointing at it; the README's defaults are `make run`'s. The walk-through runs
twice on the same stack and data: the second run shows it makes fresh addresses, as it says.
The launcher's output (with every service's log) is kept in `.artifacts/readme/make-run.log`, each
session's transcript beside it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.local.processes import (
    AddressInUse,
    HarnessError,
    Process,
    base_url,
    free_port,
    start_fresh,
    stop_all,
)
from tests.harness import inherited
from tests.helpers import drop_redis_keys, fresh_database

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
ARTIFACTS = ROOT / ".artifacts" / "readme"
MARK = "<!-- run -->"
LANGUAGES = ("sh", "python")
READY = "Press Ctrl-C to stop."  # the launcher's banner ends with it once everything is healthy
START_TIMEOUT = 60.0
SESSION_TIMEOUT = 60.0
BLOCK_HEADER = "### README.md line "
PYTHON_END = "README_PYTHON_BLOCK_END"
JWT = re.compile(r"eyJ[\w-]+\.eyJ[\w-]+\.")
# The try-it-out webhook secret the README starts make run with (a test of its own checks it is there).
WEBHOOK_SECRET = "whsec_dHJ5LWl0LW91dC1vbmx5LW5vdC1hLXNlY3JldCEh"


class ReadmeError(AssertionError):
    """The README breaks the convention (a mark on a block that cannot run, a mark without a block)."""


@dataclass(frozen=True)
class Block:
    """One runnable block: its language, its text, and the README line its fence opens on."""

    language: str
    text: str
    line: int


def runnable_blocks(markdown: str) -> list[Block]:
    """The blocks marked runnable, in document order (see the module's docstring)."""
    lines = markdown.splitlines()
    blocks: list[Block] = []
    fence: str | None = None  # the opening fence of the block being skipped or read
    language, opened, marked = "", 0, False
    body: list[str] = []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if fence is not None:  # inside a block: a run of its fence's character, as long or longer, ends it
            if re.fullmatch(rf"{re.escape(fence[0])}{{{len(fence)},}}", stripped):
                if marked:
                    blocks.append(Block(language, "\n".join(body), opened))
                fence, marked, body = None, False, []
            elif marked:
                body.append(line)
            continue
        opening = re.match(r"^(`{3,}|~{3,})\s*(\S*)", stripped)
        if opening:
            fence, language, opened = opening.group(1), opening.group(2), number
            marked = number > 1 and lines[number - 2].strip() == MARK
            if marked and language not in LANGUAGES:
                raise ReadmeError(
                    f"README.md:{number}: a {MARK} block is {' or '.join(LANGUAGES)}, not {language!r}"
                )
            continue
        if number > 1 and lines[number - 2].strip() == MARK:
            raise ReadmeError(f"README.md:{number - 1}: {MARK} must be the line right above a block's fence")
    if fence is not None:
        raise ReadmeError(f"README.md:{opened}: this block has no closing fence")
    if lines and lines[-1].strip() == MARK:
        raise ReadmeError(f"README.md:{len(lines)}: {MARK} must be the line right above a block's fence")
    return blocks


def session_script(blocks: list[Block]) -> str:
    """The bash script that runs the blocks in order, each announced by a header line."""
    parts = ["set -euo pipefail"]
    for block in blocks:
        parts.append(f"echo '{BLOCK_HEADER}{block.line}'")
        if block.language == "python":
            if PYTHON_END in block.text:
                raise ReadmeError(f"README.md:{block.line}: a python block may not contain {PYTHON_END}")
            parts.append(f"\"$README_PYTHON\" - <<'{PYTHON_END}'\n{block.text}\n{PYTHON_END}")
        else:
            parts.append(block.text)
    return "\n".join(parts) + "\n"


def silent_blocks(transcript: str) -> list[int]:
    """The README lines of the blocks that printed nothing, from the session's transcript."""
    silent: list[int] = []
    for section in transcript.split(BLOCK_HEADER)[1:]:
        line, _, output = section.partition("\n")
        if not output.strip():
            silent.append(int(line))
    return silent


@dataclass(frozen=True)
class Stack:
    """`make run`'s system, started by its launcher on free ports and a folder of the test's own."""

    base: str
    data_dir: Path
    launcher: Process
    webhook_port: int  # where the README's webhook receiver listens (AUTH_WEBHOOK_URLS names it)


def launcher_env(data_dir: Path, database_url: str, redis_url: str, redis_prefix: str) -> dict[str, str]:
    """The launcher's environment: the caller's without service settings, then where it runs."""
    env = inherited(os.environ)
    env.pop("GATEWAY_TRUSTED_PROXIES", None)
    env.pop("AUTH_SMTP_URL", None)  # the embedded mail server, as under make run
    for name in [name for name in env if "_WEBHOOK_" in name]:
        env.pop(name)  # the README's webhook settings only (readme_stack)
    return env | {
        "RUN_DATA_DIR": str(data_dir),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "AUTH_REDIS_PREFIX": f"{redis_prefix}auth:",
        "REFERRAL_REDIS_PREFIX": f"{redis_prefix}referral:",
        "PYTHONUNBUFFERED": "1",
    }


def wait_ready(launcher: Process, deadline: float) -> None:
    """Until the launcher's banner says everything is up; AddressInUse when a port was taken meanwhile."""
    while READY not in launcher.output():
        assert launcher.popen is not None
        if launcher.popen.poll() is not None:
            if "already in use" in launcher.output():
                raise AddressInUse(f"{launcher.name}: a port was taken between its pick and its bind")
            code = launcher.popen.returncode
            raise HarnessError(f"{launcher.name} exited with {code}:\n{launcher.log_tail(60)}")
        if time.monotonic() > deadline:
            raise HarnessError(f"{launcher.name} not ready in time:\n{launcher.log_tail(60)}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def readme_stack(
    server_database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """`python -m deploy.local.run` on free ports, a temporary data folder and a fresh database."""
    data_dir = tmp_path_factory.mktemp("readme-data")
    prefix = f"readme:{secrets.token_hex(6)}:"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "make-run.log").unlink(missing_ok=True)
    with fresh_database(server_database_url, "readme") as database_url:
        env = launcher_env(data_dir, database_url, redis_url, prefix)

        def attempt(started: list[Process]) -> Stack:
            port = free_port()
            ports = {"PORT": str(port)} | {
                name: str(free_port()) for name in ("RUN_AUTH_PORT", "RUN_REFERRAL_PORT")
            }
            # The README starts make run with a webhook endpoint for its receiver (section "Webhooks"):
            # the same settings, on a free port instead of 9000.
            webhook_port = free_port()
            webhooks = {
                "AUTH_WEBHOOK_URLS": f"http://127.0.0.1:{webhook_port}/webhooks",
                "AUTH_WEBHOOK_SECRET": WEBHOOK_SECRET,
            }
            launcher = Process(
                "make-run",
                [sys.executable, "-m", "deploy.local.run"],
                env | ports | webhooks,
                port=port,
                log_dir=ARTIFACTS,
            )
            launcher.start()
            started.append(launcher)
            wait_ready(launcher, time.monotonic() + START_TIMEOUT)
            return Stack(base_url(port), data_dir, launcher, webhook_port)

        try:
            stack, started = start_fresh(attempt)
            try:
                yield stack
            finally:
                problems = stop_all(started)
            assert not problems, "make run did not stop cleanly:\n" + "\n".join(problems)
        finally:
            drop_redis_keys(redis_url, prefix)


def run_session(stack: Stack, blocks: list[Block], tmp_path: Path) -> str:
    """Run the blocks in one bash session against the stack; its transcript (stdout and stderr)."""
    script = tmp_path / "readme-session.sh"
    script.write_text(session_script(blocks))
    env = inherited(os.environ) | {
        "BASE": stack.base,
        "MAIL_DIR": str(stack.data_dir / "mail"),
        "WEBHOOK_PORT": str(stack.webhook_port),
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "README_PYTHON": sys.executable,
        "TMPDIR": str(tmp_path),
    }
    session = subprocess.Popen(
        ["bash", "--noprofile", "--norc", str(script)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        process_group=0,
    )
    try:
        output, _ = session.communicate(timeout=SESSION_TIMEOUT)
    except subprocess.TimeoutExpired:
        session.kill()
        output, _ = session.communicate()
        pytest.fail(f"the README's blocks did not finish in {SESSION_TIMEOUT:.0f} s:\n{output.decode()}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session.pid, signal.SIGKILL)  # whatever a block left running in the background
    transcript = output.decode(errors="replace")
    (ARTIFACTS / f"session-{tmp_path.name}.txt").write_text(transcript)
    assert session.returncode == 0, (
        f"the README's blocks failed (exit {session.returncode}); the last block announced is the one"
        f" that failed:\n{transcript}"
    )
    return transcript


@pytest.mark.timeout(START_TIMEOUT + SESSION_TIMEOUT + 30)
@pytest.mark.parametrize("run", [1, 2], ids=["first-run", "second-run-on-the-same-data"])
def test_the_readme_walkthrough_runs_as_written(readme_stack: Stack, run: int, tmp_path: Path) -> None:
    blocks = runnable_blocks(README.read_text())
    transcript = run_session(readme_stack, blocks, tmp_path)
    assert [int(line) for line in re.findall(rf"^{BLOCK_HEADER}(\d+)$", transcript, re.M)] == [
        block.line for block in blocks
    ]
    assert not silent_blocks(transcript), f"these README blocks print nothing: {silent_blocks(transcript)}"
    assert not JWT.search(transcript), f"a README block prints a token:\n{transcript}"


def test_the_readme_has_runnable_walkthroughs_that_take_the_stack_from_variables() -> None:
    """The walk-throughs exist, and reach the system only through BASE and MAIL_DIR (make run's
    defaults): a hard-coded address would pass here against a developer's `make run`, not ours."""
    blocks = runnable_blocks(README.read_text())
    text = "\n".join(block.text for block in blocks)
    needs = ("/signup", "/email/verify", "/referral/codes", "/stats", "/leaderboard", "/password/reset")
    for needed in (*needs, "Idempotency-Key", "Webhook(SECRET).verify"):
        assert needed in text, f"no runnable README block uses {needed}"
    assert {block.language for block in blocks} == {"sh", "python"}
    assert blocks[0].text.startswith("BASE=${BASE:-http://127.0.0.1:8080}\n") or blocks[0].text.startswith(
        "BASE=${BASE:-http://127.0.0.1:8080} "
    )
    assert "MAIL_DIR=${MAIL_DIR:-.data/mail}" in blocks[0].text
    rest = text.replace("${BASE:-http://127.0.0.1:8080}", "").replace("${MAIL_DIR:-.data/mail}", "")
    # The webhook receiver listens on loopback, where make run's AUTH_WEBHOOK_URLS points.
    rest = rest.replace('ThreadingHTTPServer(("127.0.0.1", PORT), Receiver)', "")
    assert "127.0.0.1" not in rest and "localhost" not in rest
    assert ".data/" not in rest
    assert "2030-" not in text  # dates are computed, never fixed


SAMPLE = """# Title

```sh
make run
```

<!-- run -->
```sh
echo one
```

Text.
<!-- run -->
````python
print("two")
```
still python
````

```json
{"not": "run"}
```
"""


def test_the_convention_runs_only_marked_sh_and_python_blocks() -> None:
    blocks = runnable_blocks(SAMPLE)
    assert blocks == [Block("sh", "echo one", 8), Block("python", 'print("two")\n```\nstill python', 14)]
    script = session_script(blocks)
    assert script.startswith("set -euo pipefail\n")
    assert "make run" not in script and "not" not in script
    assert f'"$README_PYTHON" - <<\'{PYTHON_END}\'\nprint("two")' in script


@pytest.mark.parametrize(
    ("markdown", "message"),
    [
        ("<!-- run -->\n```json\n{}\n```\n", "block is sh or python"),
        ("<!-- run -->\n```\nls\n```\n", "block is sh or python"),
        ("<!-- run -->\n\n```sh\nls\n```\n", "right above"),
        ("text\n<!-- run -->\n", "right above"),
        ("<!-- run -->\n```sh\nls\n", "no closing fence"),
    ],
)
def test_a_mark_that_cannot_run_is_refused(markdown: str, message: str) -> None:
    with pytest.raises(ReadmeError, match=message):
        runnable_blocks(markdown)


def test_the_session_fails_on_the_first_failing_command_and_names_the_block(tmp_path: Path) -> None:
    blocks = [Block("sh", "echo first", 3), Block("sh", "false\necho never", 9), Block("sh", "echo ok", 20)]
    script = tmp_path / "s.sh"
    script.write_text(session_script(blocks))
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert done.stdout == f"{BLOCK_HEADER}3\nfirst\n{BLOCK_HEADER}9\n"
    assert silent_blocks(done.stdout) == [9]
    for failing in ("echo $UNSET_VARIABLE", "false | cat", "x=$(false)"):
        script.write_text(session_script([Block("sh", f"{failing}\necho reached", 1)]))
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
        assert done.returncode != 0, failing
        assert "reached" not in done.stdout


def test_the_webhook_walkthrough_starts_make_run_with_the_settings_this_test_gives_it() -> None:
    """The README's make run command for the receiver names the secret and the endpoint this test
    hands the launcher (on another port): the walk-through a reader follows is the one run here."""
    text = README.read_text()
    assert f"AUTH_WEBHOOK_SECRET={WEBHOOK_SECRET} make run" in text
    assert "AUTH_WEBHOOK_URLS=http://127.0.0.1:9000/webhooks" in text
    assert 'os.environ.get("WEBHOOK_PORT", "9000")' in text
