"""``wujie-async``, the command line: one job (``generate``/``edit``/``status``), the bulk job
(``bulk``/``resume``), its journal (``journal list|resend|forget``) and the emulator.

A world of its own on top of the library: it uses the library's public names, plus these
documented internal seams, each for one reason:

* ``wujie_async._image_formats`` (``sniff_format``) and ``wujie_async._file_names``
  (``DEFAULT_NAME``, ``render_name`` and the checks of ``--name``): image formats and file
  names, shared with the library (images are saved through ``WujieClient.download``, the
  client's one downloader);
* ``wujie_async._models`` (``GenerationRequest``, ``EditRequest``): every input row is checked
  against the per-model rules before anything is sent;
* ``wujie_async._env`` (``Environment``): the environment is read in one place;
* ``wujie_async._journal`` (``ALL_STATES``): the row states ``journal list`` filters on;
* ``wujie_async._telemetry`` (``show_log``, ``log_level``): ``--verbose`` and ``WUJIE_LOG`` show
  the library's log the one way the library itself does;

Modules: ``_main`` (the entry point: logging, signals, how an error ends the process),
``_parser`` (the parser), ``_dispatch`` (a parsed command line checked and run), ``_common``
(exit codes, opening a client), ``_input`` (reading bulk input files), ``_single`` (one job at
a time), ``_run`` (what ``bulk``, ``resume`` and ``status`` do), ``_summary`` (a run's
summary), ``_bulk`` (the bulk job itself, with ``_bulk_data``, ``_stops``, ``_run_rows``,
``_image_problems`` and ``_manifest_keys``), ``_outcome`` (how each line ended), ``_manifest``
(the manifest's file and rows), ``_manifest_prices`` (the points and prices its rows tell),
``_progress`` (the progress display), ``_journal_commands`` (and ``_journal_rows``: which rows
its words name).
"""

from ._main import main
from ._parser import build_parser

__all__ = ["build_parser", "main"]
