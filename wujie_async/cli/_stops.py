"""Why a run stops sending before its input is done (besides a signal and a systemic
error of the gateway): a disk that refuses the manifest, an image or the journal, or a
gateway that gives no usable reply, in words that say what to do."""

from __future__ import annotations

from ._rows import ROWS_DEADLINE_S

# What a disk's stop advises; ``generate`` and ``edit`` say instead how to collect their job
# (run again, they send a new one, paid again).
RE_RUN = "then re-run the same command"


class OutputUnwritableError(Exception):
    """The output folder refused the manifest, or an image for its disk's sake (full,
    read-only, not writable), or the journal refused a submit's intent: the run stops
    sending."""

    def __init__(self, what: str, why: str, where: str = "the output folder") -> None:
        super().__init__(
            f"stopped: {what} ({why}); nothing more was sent. Make room in (or fix the "
            f"permissions of) {where}, {RE_RUN}"
        )
        # What to say instead when the rows not written hold no job key (nothing is listed).
        self.without_keys: str | None = None

    def said(self, keys_listed: bool) -> str:
        """The message, for a summary that lists the rows' keys below it or lists none."""
        return str(self) if keys_listed or self.without_keys is None else self.without_keys

    @classmethod
    def of(cls, what: str, cause: OSError) -> OutputUnwritableError:
        return cls(what, cause.strerror or type(cause).__name__)

    @classmethod
    def manifest_held(cls) -> OutputUnwritableError:
        """The manifest's disk stopped answering (a hung mount, a frozen file system)."""
        return cls(
            "the manifest could not be written", f"its disk took no row for {ROWS_DEADLINE_S:g} s"
        )

    @classmethod
    def manifest_cut_short(cls) -> OutputUnwritableError:
        """A signal ended the wait for the manifest's last rows before its disk took them."""
        error = cls("", "")
        error.args = (
            "stopped: the manifest's last rows were not written (a signal ended the wait for "
            "its disk); the jobs they name are listed below (`wujie-async status KEY --wait "
            "-o OUT` saves one)",
        )
        error.without_keys = (
            "stopped: the manifest's last rows were not written (a signal ended the wait for "
            "its disk); none of them held a job key (lines not sent, or sent without a reply), "
            "so no job is listed"
        )
        return error

    @classmethod
    def manifest_gone(cls, *, journaled: bool = False) -> OutputUnwritableError:
        """The manifest was deleted under the run. ``journaled``: the run keeps a journal,
        which a re-run goes by for the lines it holds, if it was not deleted too (the
        default one is in the folder): a re-run then pays for none of them again."""
        rerun = (
            "a re-run of the same command collects them and sends the rest if the journal "
            "is still there (one kept in a folder that was removed is gone too: the re-run "
            "would then send every line again)"
            if journaled
            else "a re-run of the same command would send every line again"
        )
        error = cls("", "")
        error.args = (
            "stopped: the manifest was deleted while this run wrote it (its folder removed?); "
            "nothing more was sent. Its rows are gone: the jobs this run paid for are listed "
            f"below (`wujie-async status KEY --wait -o OUT` saves one), and {rerun}",
        )
        error.without_keys = (
            "stopped: the manifest was deleted while this run wrote it (its folder removed?); "
            "nothing more was sent. Its rows are gone, and none of them held a job key (no job "
            "of this run is listed); a re-run of the same command would send every line again"
        )
        return error


# Submits in a row without a usable reply (a 5xx, a page that is not JSON, a reply cut off)
# that stop the sending. Each may have been charged, so none is resent; a gateway that is down
# made every line of a run uncertain within seconds (100 of 100), each to be checked by hand
# in the console. At 10% of such replies at random, 8 in a row come once in 10**8 submits.
UNCERTAIN_IN_A_ROW = 8


class GatewayFailingError(Exception):
    """Submits in a row got no usable reply: the run stops sending (a systemic stop)."""

    def __init__(self, count: int, last: str) -> None:
        super().__init__(
            f"stopped: {count} submits in a row got no usable reply (the last: {last}); "
            "nothing more was sent, as each may have been charged. Re-run the same command "
            "once the gateway answers: the lines not sent are sent then"
        )
