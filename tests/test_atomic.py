"""visualchat.atomic: a figure is written whole or not at all."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from visualchat.atomic import atomic_save_figure  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_a_figure_is_written_as_png_into_a_new_folder(tmp_path) -> None:
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = tmp_path / "plots" / "line.png"
    atomic_save_figure(fig, path)
    plt.close(fig)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert [p.name for p in path.parent.iterdir()] == ["line.png"]  # no temporary file left


def test_a_failed_render_leaves_the_old_file_as_it_was(tmp_path, monkeypatch) -> None:
    path = tmp_path / "line.png"
    path.write_bytes(b"old")
    fig, _ = plt.subplots()

    def broken(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError):
        atomic_save_figure(fig, path)
    plt.close(fig)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["line.png"]
