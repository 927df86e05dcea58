"""A run's summary: how its lines ended, what it cost, and the commands to run next (on
stderr; with ``--json``, also one object on stdout), and the command's exit code. Its
warnings of what went wrong beside the lines are ``_run_warnings``'s."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.text import Text

from .._errors import some_and_more
from .._file_names import DEFAULT_NAME
from .._gateway_identity import shown_base_url
from ._bulk_data import BulkResult
from ._common import (
    DOWNLOAD_DEFAULTS,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SYSTEMIC,
    EXIT_TERMINATED,
    print_json_ending,
    shell_path,
)
from ._image_problems import NOT_AN_IMAGE, TOO_LARGE
from ._manifest_prices import Unreported, priced_at, with_learned_prices
from ._outcome import OTHER_GATEWAY, LineOutcome, clean, count
from ._run_warnings import forget_failed_said, journal_left_said, keys_held, stop_said
from ._signals import Signals
from ._stops import RE_RUN

# What generate or edit says beside the command that collects its job: the obvious other way
# pays again.
_PAYS_AGAIN = "(running the same command again sends a new job, paid again)"


def _line_name(outcome: LineOutcome) -> str:
    if outcome.row_id is not None:
        return f"line {outcome.line} (id {clean(outcome.row_id)})"
    return f"line {outcome.line}"


def _sh(path: Path | str | None) -> str:
    """A path as a shell reads it back: the commands we print are to be pasted."""
    return shell_path(path)


class RunState(Protocol):
    """What the summary reads of the run it sums up (``_run.Session``)."""

    @property
    def args(self) -> argparse.Namespace: ...
    @property
    def console(self) -> Console: ...
    @property
    def journal(self) -> Path | None: ...
    @property
    def result(self) -> BulkResult | None: ...
    @property
    def base_url(self) -> str: ...
    @property
    def signals(self) -> Signals | None: ...
    @property
    def terminated(self) -> bool: ...
    @property
    def journal_left(self) -> list[str]: ...
    @property
    def forget_failed(self) -> str | None: ...
    @property
    def forget_rows(self) -> list[int]: ...
    @property
    def points(self) -> float: ...
    @property
    def points_uncertain(self) -> float: ...
    @property
    def unreported_before(self) -> Unreported: ...
    @property
    def prices_learned(self) -> dict[str, float]: ...
    def spent_before(self) -> float: ...


class Summary:
    """The summary of a run that has ended (its result set)."""

    def __init__(self, run: RunState) -> None:
        self._run = run
        self.args = run.args
        self.console = run.console
        self.journal = run.journal
        self.result = run.result
        self.base_url = run.base_url
        self.signals = run.signals
        self.journal_left = run.journal_left
        self.forget_failed = run.forget_failed
        self.forget_rows = run.forget_rows
        self.points = run.points
        self.points_uncertain = run.points_uncertain
        self.unreported_before = run.unreported_before
        self.prices_learned = run.prices_learned

    def _say(self, message: str) -> None:
        if not self.args.quiet:
            self.console.print(Text(message), soft_wrap=True)

    def _point_prices(self, learned: dict[str, float]) -> dict[str, float] | None:
        """The user's ``--point-price`` table, with ``learned`` for the kinds it gives no
        price for."""
        return with_learned_prices(getattr(self.args, "point_prices", None), learned) or None

    def finish(self, total: int) -> int:
        """Print the summary (stderr; ``--json`` also on stdout) and return the exit code."""
        result = self.result
        assert result is not None
        counts = count(result.outcomes)
        stopped = self._for_one_job(
            stop_said(result, self.base_url, app_id_flag=bool(getattr(self.args, "app_id", None)))
        )
        if result.interrupted or (self.signals is not None and self.signals.received):
            # A signal is the stronger word, after a systemic stop too: a supervisor that sent
            # SIGTERM reads 143 as "stopped as asked" (the summary still says what stopped it).
            # So after the run's end: a signal in its closing waits ends the command as asked.
            code = EXIT_TERMINATED if self._run.terminated else EXIT_INTERRUPTED
        elif stopped is not None:
            code = EXIT_SYSTEMIC
        elif counts["saved"] == total:
            code = EXIT_OK
        else:
            code = EXIT_FAILED
        out = self.args.out
        parts = " · ".join(f"{name} {counts[name]}" for name in counts if counts[name])
        self.console.print(
            Text(
                f"{total} line(s): {parts or 'none ended'}"
                + (f" · pending {result.pending}" if result.pending else "")
                + f"; {result.images} image(s) saved in {out}/ (manifest: {out / 'manifest.jsonl'})"
                + self._points_said()
            ),
            soft_wrap=True,
        )
        self._hints(counts, result, stopped)
        if getattr(self.args, "json", False):
            summary = {
                "lines": total,
                "outcomes": dict(counts),
                "pending": result.pending,
                "images": result.images,
                "exit_code": code,
                "stopped": stopped,
                "manifest": str(out / "manifest.jsonl"),
                "journal": str(self.journal) if self.journal else None,
                "points": self.points,
                "points_total": self._run.spent_before() + self.points,
                # The part of points_total counted at a price: earlier jobs whose cost the
                # gateway did not report.
                "points_estimated": self.unreported_before.points,
                # The keys the summary lists to keep: jobs whose rows the manifest did not
                # take, and jobs whose records the journal had not committed.
                "manifest_unwritten_keys": keys_held(result.unrecorded),
                "journal_uncommitted_keys": list(self.journal_left),
                # Lines whose job another gateway accepted: not collected here, not resent.
                "other_gateway": [
                    {"line": o.line, "id": o.row_id, "key": o.key, "base_url": o.base_url}
                    for o in result.outcomes
                    if o.error_code == OTHER_GATEWAY
                ],
                # As every --json ending has: what ended the command early (null: nothing).
                "error": stopped,
            }
            if self.args.command in ("generate", "edit", "status"):
                summary["paths"] = [str(path) for path in result.saved_paths]
            print_json_ending(summary)
        elif self.args.command in ("generate", "edit", "status"):
            for path in result.saved_paths:
                print(path)  # noqa: T201 - the saved paths are this command's output
        return code

    def _points_said(self) -> str:
        before, unreported = self._run.spent_before(), self.unreported_before
        if not self.points and not before and not self.points_uncertain:
            return ""
        estimated = (
            f", {unreported.points:g} of it for {unreported.priced} earlier job(s) whose cost "
            "was not reported, at their kind's price"
            if unreported.priced
            else ""
        )
        earlier = f" ({before + self.points:g} with earlier runs{estimated})" if before else ""
        budget = getattr(self.args, "max_points", None)
        of = f" of a {budget:g} budget" if budget is not None else ""
        maybe = (
            f", and up to {self.points_uncertain:g} on uncertain lines"
            if self.points_uncertain
            else ""
        )
        return f"; {self.points:g} points spent{earlier}{maybe}{of}"

    def _elsewhere_said(self, elsewhere: list[LineOutcome]) -> None:
        """Lines whose job another gateway accepted (another base URL or app id): each named
        with the base URL that took it, and the command that collects them there."""
        by_url: dict[str, list[LineOutcome]] = {}
        for outcome in elsewhere:
            by_url.setdefault(outcome.base_url or "(not recorded)", []).append(outcome)
        named = [
            f"{some_and_more([_line_name(o) for o in outcomes], 10)} by base URL {url}"
            for url, outcomes in by_url.items()
        ]
        first = next(iter(by_url))
        where = f" {_sh(self.journal)}" if self.journal is not None else ""
        self._say(
            f"{len(elsewhere)} line(s) were accepted (paid) by another gateway than this "
            f"run's (base URL {shown_base_url(self.base_url)}): {'; '.join(named[:3])}"
            f"{f' (and {len(named) - 3} base URL(s) more)' if len(named) > 3 else ''}. A job key "
            "is known only to the gateway and account that took it (a base URL spelled "
            "otherwise, localhost for 127.0.0.1, counts as another): they were not asked of "
            "this one, nor sent again, and their journal rows are as they were. Collect them on "
            "the gateway that took them "
            "(with the app id and key that sent them, if that was another account):\n"
            f"  wujie-async resume{where} --out {_sh(self.args.out)} --base-url {_sh(first)}"
        )

    def _unreported_said(self, result: BulkResult) -> None:
        """What the summary's points leave out: jobs that ended without a reported cost."""
        price = "give its model's price with --point-price MODEL=POINTS (points per image)"
        if result.uncosted:
            prices = dict(self.prices_learned)
            for key, each in result.prices.items():  # the most a kind cost wins
                prices[key] = max(prices.get(key, 0.0), each)
            now = priced_at(result.uncosted, self._point_prices(prices) or {})
            about = f" (about {now.points:g} at their kind's price)" if now.priced else ""
            self._say(
                f"the gateway did not report what {now.jobs} job(s) of this run cost: the "
                f"points above leave them out{about}; a re-run of this input counts each at "
                "its kind's price (its --point-price, or what the gateway reported for others "
                "of the kind), with earlier runs and against --max-points"
                + (
                    f"; {now.unpriced} of them have no known price: for a re-run to count "
                    f"them, {price}"
                    if now.unpriced
                    else ""
                )
            )
        if self.unreported_before.unpriced:
            self._say(
                f"{self.unreported_before.unpriced} job(s) of earlier runs saved their images "
                "without a reported cost, and their kind has no known price: nothing counts "
                f"them (with earlier runs, or against --max-points); {price}"
            )

    @property
    def _one_job(self) -> bool:
        """``generate`` and ``edit``: run again, they send a new job (paid again) instead of
        collecting the one they sent; ``status KEY --wait`` collects it."""
        return self.args.command in ("generate", "edit")

    def _for_one_job(self, stopped: str | None) -> str | None:
        """What stopped ``generate`` or ``edit`` (a disk that refused its image), with the
        command that collects its job where it said to re-run the same command: that sends
        a new job, paid again, while the one it paid for is done or still running."""
        result = self.result
        if stopped is None or result is None or not self._one_job or RE_RUN not in stopped:
            return stopped
        keys = list(
            dict.fromkeys(
                [o.key for o in result.outcomes if o.key and o.status != "saved"]
                + result.pending_keys
            )
        )
        if not keys:  # no job was accepted: nothing is paid, and running it again is right
            return stopped
        return stopped.replace(RE_RUN, f"then collect its job with {self._collect(keys)}", 1) + (
            f" {_PAYS_AGAIN}"
        )

    def _collect(self, keys: list[str]) -> str:
        """The command that collects (waits for and saves) the jobs of ``keys``."""
        name = getattr(self.args, "name", None)
        named = f" --name {_sh(name)}" if name and name != DEFAULT_NAME else ""
        return f"wujie-async status {' '.join(keys)} --wait -o {_sh(self.args.out)}{named}"

    def _hints(self, counts: Any, result: BulkResult, stopped: str | None) -> None:
        say = self._say
        if self.journal_left:
            self.console.print(
                Text(journal_left_said(self.journal, self.journal_left)), soft_wrap=True
            )
        if self.forget_failed is not None:
            self.console.print(
                Text(forget_failed_said(self.forget_failed, self.journal, self.forget_rows)),
                soft_wrap=True,
            )
        self._unreported_said(result)
        if stopped is not None:
            self.console.print(Text(stopped), soft_wrap=True)
            if not result.interrupted:
                return
        # Quoted for a shell: it is to be pasted as it is (a path with a space, a --name).
        command = shlex.join(sys.argv[1:]) if sys.argv[1:] else "bulk ..."
        if str(getattr(self.args, "file", "")) == "-":
            command += "  # fed the same input on stdin"  # else it reads the terminal
        if result.interrupted:
            word = "stopped by SIGTERM" if self._run.terminated else "interrupted"
            uncertain = [o for o in result.outcomes if o.error_code == "interrupted"]
            if uncertain:
                names = some_and_more([_line_name(o) for o in uncertain], 10)
                see = (
                    f"wujie-async journal list --status uncertain --journal {_sh(self.journal)}"
                    if self.journal is not None
                    else "the gateway's console (no journal kept their fate)"
                )
                say(
                    f"interrupted at once: {len(uncertain)} line(s) were being submitted and may "
                    f"have been charged ({names}); they are never resent silently. "
                    f"See: {see}"
                )
            if self.journal is not None and self.args.command == "resume":
                # It never sends: "send the rest" and "or collect only" said it might.
                say(
                    f"{word}: submitted jobs keep running on the gateway; run it again to "
                    f"collect the rest (it sends nothing):\n  wujie-async {command}"
                )
            elif self.journal is not None:
                # The images keep this run's names (resume's default is another).
                name = getattr(self.args, "name", None)
                # (--name=: a template that starts with "-" is no option either.)
                sep = "=" if str(name).startswith("-") else " "
                named = f" --name{sep}{shlex.quote(name)}" if name and name != DEFAULT_NAME else ""
                say(
                    f"{word}: submitted jobs keep running on the gateway; re-run the same "
                    f"command to collect them and send the rest:\n  wujie-async {command}\n"
                    f"(or collect only: wujie-async resume {_sh(self.journal)} "
                    f"--out {_sh(self.args.out)}{named})"
                )
            elif self.args.emulator:
                say(f"{word} (the embedded emulator stops with this process)")
            else:
                # (Keys the manifest could not take are listed above: a re-run would not know
                # them, and would send their lines again.)
                except_listed = (
                    ", but for the keys listed above (look them up with wujie-async status "
                    "KEY; a re-run would send their lines again)"
                    if result.unrecorded
                    else ""
                )
                if self._one_job and result.pending_keys:
                    say(
                        f"{word}: the job keeps running on the gateway (paid); collect it "
                        f"with:\n  {self._collect(result.pending_keys)}\n{_PAYS_AGAIN}"
                    )
                elif not self._one_job:
                    say(
                        f"{word}: submitted jobs keep running on the gateway; their keys are "
                        f"in the manifest (pending rows){except_listed}: re-run the same "
                        f"command to collect them and send the rest:\n  wujie-async {command}"
                    )
            return
        unpriced = sum(1 for o in result.outcomes if o.error_code == "unpriced")
        if unpriced:
            say(
                f"{unpriced} line(s) not sent: the gateway has not reported what these jobs "
                "cost (it does not say, or the first job ended without saying: it timed out, "
                "its reply was lost, or the gateway lost it), so --max-points "
                "cannot be held; give each model's price with --point-price MODEL=POINTS "
                "and re-run"
            )
        over = sum(1 for o in result.outcomes if o.error_code == "budget")
        if over:
            # Lines this run resent (failed, or uncertain) and the budget kept back are still
            # failed or uncertain to a re-run: without the flag that chose them, it skips them.
            again = [
                flag
                for flag, on in (
                    ("--retry-failed", getattr(self.args, "retry_failed", False)),
                    ("--retry-uncertain", getattr(self.args, "retry_uncertain", False)),
                )
                if on
            ]
            with_flags = f" and {' '.join(again)}" if again else ""
            say(
                f"{over} line(s) not sent: over the points budget (--max-points "
                f"{self.args.max_points:g}); re-run with a larger --max-points{with_flags} to "
                "send them"
            )
        accepted = sum(
            1
            for o in result.outcomes
            if o.status == "uncertain" and o.error_code in ("protocol_error", "unknown_job")
        )
        missing: list[str | None] = []
        if self.args.command == "status":
            # Keys typed in: one never listed is most likely mistyped, not a job seen accepted.
            missing = [
                o.key
                for o in result.outcomes
                if o.error_code == "unknown_job" and o.error and ": not found:" in o.error
            ]
            if missing:
                accepted -= len(missing)
                say(
                    f"{len(missing)} key(s) the gateway does not list (not found): check each "
                    "key (a mistyped one, or another app's); a job whose result was cleaned up "
                    "is gone from the gateway too: "
                    + some_and_more([clean(key) for key in missing if key], 10)
                )
        if accepted and self.args.command in ("bulk", "resume"):
            resend = (
                "resend them by adding --retry-uncertain to the bulk command"
                if self.args.command == "resume"
                else "resend them by adding --retry-uncertain"
            )
            say(
                f"{accepted} line(s) were accepted by the gateway, which then reported them "
                "only in ways that could not be read, or never listed or forgot them: they may "
                "have run and been charged, and are never resent silently. A re-run of the "
                "same command asks about them again (and saves their images if the gateway "
                "lists them done then); `wujie-async status KEY` asks about one (keys in the "
                f"manifest); {resend} once the gateway's console shows they were not charged"
            )
        elif accepted:
            # generate/edit run again send a new job (paid again), and neither has
            # --retry-uncertain.
            keys = [
                o.key
                for o in result.outcomes
                if o.status == "uncertain"
                and o.error_code in ("protocol_error", "unknown_job")
                and o.key
            ]
            say(
                f"{accepted} line(s) were accepted by the gateway, which then reported them "
                "only in ways that could not be read, or never listed or forgot them: they may "
                "have run and been charged, and are never resent silently. Ask about them "
                f"again, and save their images if the gateway lists them done, with:\n  "
                f"{self._collect(keys)}" + (f" {_PAYS_AGAIN}" if self._one_job else "")
            )
        elsewhere = [o for o in result.outcomes if o.error_code == OTHER_GATEWAY]
        if elsewhere:
            self._elsewhere_said(elsewhere)
        if counts["uncertain"] - accepted - len(missing):
            see = (
                f"wujie-async journal list --status uncertain --journal {_sh(self.journal)}"
                if self.journal is not None
                else f"their rows in {self.args.out / 'manifest.jsonl'} (status uncertain)"
            )
            resend = (
                "run the same command again (it sends a new job)"
                if self._one_job
                else "resend them by adding --retry-uncertain"
            )
            say(
                f"{counts['uncertain'] - accepted - len(missing)} line(s) may "
                "have been charged "
                "without a "
                f"reply; they are never resent silently. See them with: {see}; once the "
                f"gateway's console shows they were not charged, {resend}"
            )
        timed_out = sum(1 for o in result.outcomes if o.error_code == "timeout")
        if timed_out:
            # Paid and maybe still running: collected by a re-run, never resent.
            keys = [o.key for o in result.outcomes if o.error_code == "timeout" and o.key]
            how = (
                f"collect it with {self._collect(keys)} {_PAYS_AGAIN}"
                if self._one_job
                else "re-run the same command to collect them (they are not sent again)"
            )
            say(
                f"{timed_out} line(s) timed out while their jobs still ran on the gateway "
                f"(already paid); {how}; --job-timeout sets how long to wait"
            )
        unsaved = sum(1 for o in result.outcomes if o.error_code == "download")
        too_large = sum(1 for o in result.outcomes if o.lasting == TOO_LARGE)
        not_images = sum(1 for o in result.outcomes if o.lasting == NOT_AN_IMAGE)
        if unsaved - too_large - not_images:
            keys = [
                o.key
                for o in result.outcomes
                if o.error_code == "download" and o.key and o.lasting is None
            ]
            how = (
                f"fetch them again with {self._collect(keys)} {_PAYS_AGAIN}"
                if self._one_job
                else "re-run the same command to fetch them again (they are not sent again)"
            )
            say(
                f"{unsaved - too_large - not_images} line(s) succeeded but their images could "
                f"not be saved; {how}"
            )
        if too_large:
            cap = getattr(self.args, "max_image_bytes", None) or DOWNLOAD_DEFAULTS.max_bytes
            keys = [o.key for o in result.outcomes if o.lasting == TOO_LARGE and o.key]
            how = (
                f"fetch it with {self._collect(keys)} --max-image-bytes BYTES, BYTES larger "
                f"than the cap {_PAYS_AGAIN}"
                if self._one_job
                else "re-run with a larger --max-image-bytes to fetch it (the jobs are paid "
                "and not sent again)"
            )
            say(
                f"{too_large} line(s) succeeded but an image is larger than the {cap}-byte cap "
                f"on images, so it was not saved; {how}"
            )
        if not_images:
            say(
                f"{not_images} line(s) succeeded but the gateway listed an image whose bytes are "
                "not an image (not PNG, JPEG or WEBP), so it was not saved; a re-run fails the "
                "same way: ask the gateway's operator about those jobs (keys in the manifest)"
            )
        gone = sum(1 for o in result.outcomes if o.error_code == "gone")
        if gone:
            keys = [o.key for o in result.outcomes if o.error_code == "gone" and o.key]
            how = (
                f"{self._collect(keys)} asks for its newest listing once more {_PAYS_AGAIN}"
                if self._one_job
                else "a re-run asks for their newest listing once more, and --retry-failed "
                "sends them again (each resend costs points)"
            )
            say(
                f"{gone} line(s) succeeded but their images' URLs are gone (HTTP 404 or 410: "
                f"the gateway cleans up old results); {how}"
            )
        resendable = (
            counts["failed"] - timed_out - unsaved - gone + counts["moderated"] + counts["rejected"]
        )
        if resendable and self.journal:
            say("resend the failed lines (each resend costs points) by adding --retry-failed")
