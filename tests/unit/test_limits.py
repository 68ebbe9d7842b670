"""The open-file limit the sidecar raises at start (`sidecar.limits`)."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from sidecar import limits


class FakeLimits:
    """RLIMIT_NOFILE as the kernel would hold it, with an optional refusal."""

    def __init__(self, soft: int, hard: int, refuse: BaseException | None = None) -> None:
        self.soft, self.hard = soft, hard
        self.refuse = refuse
        self.calls: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, value: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.calls.append(value)
        if self.refuse is not None:
            raise self.refuse
        self.soft, self.hard = value


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeLimits:
    fake = FakeLimits(1024, 524288)
    monkeypatch.setattr(resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", fake.setrlimit)
    return fake


class TestRaiseOpenFileLimit:
    def test_the_soft_limit_is_raised_to_the_hard_one(self, fake: FakeLimits) -> None:
        """containerd's 1024 soft under 524288 hard: the soft limit becomes 524288."""
        assert (1024, 524288) == limits.raise_open_file_limit()
        assert [(524288, 524288)] == fake.calls

    def test_an_unlimited_hard_limit_means_the_kernels_nr_open(
        self, fake: FakeLimits, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """RLIMIT_NOFILE cannot be set to infinity: the soft limit goes to fs.nr_open."""
        fake.hard = resource.RLIM_INFINITY
        monkeypatch.setattr(limits, "_nr_open", lambda: 800_000)
        assert (1024, 800_000) == limits.raise_open_file_limit()
        assert [(800_000, resource.RLIM_INFINITY)] == fake.calls

    @pytest.mark.parametrize("hard", [4_000_000, resource.RLIM_INFINITY])
    def test_the_raise_stops_at_a_million(
        self, fake: FakeLimits, monkeypatch: pytest.MonkeyPatch, hard: int
    ) -> None:
        """A hard limit (or fs.nr_open) of billions is not taken up: 2**20 at most."""
        fake.hard = hard
        monkeypatch.setattr(limits, "_nr_open", lambda: 1 << 30)
        assert (1024, 1 << 20) == limits.raise_open_file_limit()
        assert [(1 << 20, hard)] == fake.calls

    def test_a_soft_limit_already_at_the_hard_one_is_left_alone(self, fake: FakeLimits) -> None:
        fake.soft = fake.hard = 65536
        assert (65536, 65536) == limits.raise_open_file_limit()
        assert [] == fake.calls

    @pytest.mark.parametrize("refusal", [PermissionError(1, "EPERM"), ValueError("not allowed")])
    def test_a_refusal_leaves_the_limit_as_it_was(
        self, fake: FakeLimits, refusal: BaseException
    ) -> None:
        """A sandbox that refuses setrlimit does not stop the start."""
        fake.refuse = refusal
        assert (1024, 1024) == limits.raise_open_file_limit()
        assert (1024, 524288) == (fake.soft, fake.hard)

    def test_nr_open_reads_the_kernels_cap(self, tmp_path: Path) -> None:
        """fs.nr_open as the kernel shows it; its default when it cannot be read."""
        shown = tmp_path / "nr_open"
        shown.write_text("2097152\n")
        assert 2_097_152 == limits._nr_open(shown)
        assert limits.NR_OPEN_DEFAULT == limits._nr_open(tmp_path / "absent")
        shown.write_text("garbage\n")
        assert limits.NR_OPEN_DEFAULT == limits._nr_open(shown)
        real = Path("/proc/sys/fs/nr_open")
        assert int(real.read_text()) == limits._nr_open()
