"""Which flow classes the daemon resumes: only crewAI Flows, from the flows' own modules or installed packages.

The `module.Class` a request names comes from a database row. Anything but a
Flow subclass from a module under `[flows].import_paths` or an installed
package is `resume_failed` with the reason, and names that could never be a
flow are refused before anything is imported.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FLOWS, Setup, add_request, wait_until

from hitl_mail import resume
from hitl_mail.models import FeedbackRequest, RequestStatus, utcnow
from hitl_mail.store import Store

SHADOW = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
class Evil:
    pass
"""


@pytest.fixture
def shadowing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """A flows folder holding modules named like standard-library ones; (folder, marker file)."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the import paths added go with the test
    folder = tmp_path / "flows"
    folder.mkdir()
    marker = tmp_path / "imported"
    for name in ("json", "os", "string"):
        (folder / f"{name}.py").write_text(SHADOW.format(marker=str(marker)))
    (folder / "plain.py").write_text("class NotAFlow:\n    pass\n\ndef function():\n    pass\n")
    yield folder, marker
    sys.modules.pop("plain", None)


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    "dotted",
    [
        "os.system",
        "builtins.print",
        "subprocess.Popen",
        "json.Evil",  # a flows module named json.py would shadow the standard library's
        "string.Evil",
        "__main__.Flow",
        "review_flows",  # no class
        "review_flows.Review Flow",
        "review_flows.ReviewFlow;import os",
        "../review_flows.ReviewFlow",
        "review_flows..ReviewFlow",
        "review_flows.ReviewFlow\n",
        "revıew_flows.ReviewFlow",  # a dotless i
        "class.ReviewFlow",
        "",
    ],
)
def test_a_name_that_cannot_be_a_flow_module_is_refused_before_anything_is_imported(
    shadowing: tuple[Path, Path], dotted: str
) -> None:
    folder, marker = shadowing
    before = set(sys.modules)
    with pytest.raises(resume.FlowClassRefused, match="refused"):
        resume.import_flow_class(dotted, [str(folder)])
    assert not marker.exists()
    assert set(sys.modules) - before == set()


@pytest.mark.sqlite_only
def test_import_paths_come_after_the_standard_library(shadowing: tuple[Path, Path]) -> None:
    folder, marker = shadowing
    resume.add_import_paths([str(folder)])
    stdlib = str(Path(os.__file__).parent)

    assert sys.path.index(str(folder)) > sys.path.index(stdlib)
    assert importlib.util.find_spec("string").origin == str(Path(stdlib) / "string.py")
    assert not marker.exists()


@pytest.mark.sqlite_only
def test_a_module_found_nowhere_is_reported_by_name_with_the_import_paths(tmp_path: Path) -> None:
    with pytest.raises(ModuleNotFoundError, match=r"no_such_flows.*import_paths"):
        resume.import_flow_class("no_such_flows.Flow", [str(tmp_path)])


@pytest.mark.sqlite_only
@pytest.mark.parametrize("dotted", ["plain.NotAFlow", "plain.function"])
def test_a_class_that_is_not_a_crewai_flow_is_refused(
    shadowing: tuple[Path, Path], dotted: str
) -> None:
    folder, _ = shadowing
    with warnings.catch_warnings():  # crewAI's own import warns; not what is tested here
        warnings.simplefilter("ignore")
        import crewai.flow.flow  # noqa: F401
    with pytest.raises(resume.FlowClassRefused, match=re.escape("not a crewai.flow.flow.Flow")):
        resume.import_flow_class(dotted, [str(folder)])


def test_the_daemon_records_a_refused_flow_class_as_resume_failed_without_a_worker(
    setup: Setup, shadowing: tuple[Path, Path], store: Store
) -> None:
    """Refused by its name in the daemon itself: no worker needed, nothing imported."""
    folder, marker = shadowing
    setup.config.write_text(
        setup.config.read_text().replace(
            f'import_paths = ["{FLOWS}"]', f'import_paths = ["{FLOWS}", "{folder}"]'
        )
    )
    refused = {
        "os1": ("os.system", "standard-library module"),
        "json1": ("json.Evil", "standard-library module"),
        "odd1": ("review_flows.Review;Flow", "not of the form module.Class"),
    }
    for request_id, (dotted, _) in refused.items():
        add_request(store, request_id, RequestStatus.ANSWERED, answered_at=utcnow())
        with store.session() as session:  # add_request names review_flows.ReviewFlow
            row = session.get(FeedbackRequest, request_id)
            assert row is not None
            row.flow_class = dotted
            session.commit()

    setup.start_daemon()

    for request_id, (_, reason) in refused.items():
        shown = wait_until(
            lambda rid=request_id: (s := setup.show(rid))["status"] == "resume_failed" and s,
            60,
            what=f"{request_id} resume_failed\n{setup.daemon_log()[-3000:]}",
        )
        assert reason in shown["error"], shown["error"]
        assert "FlowClassRefused" in shown["error"]
    assert not marker.exists()  # the shadowing modules were never imported
