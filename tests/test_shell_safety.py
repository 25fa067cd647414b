"""Issue 18, invariant 4: untrusted strings never reach a shell. Shard names come from a manifest, which may come
from a bucket someone else writes; they are restricted to a safe character set (`pipeline.reader.index.check_shard_name`,
used by every reader, local and remote), and every value put into a `pipe:` command is checked and quoted
(`pipeline.core.remote.member_url`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.core.errors import ShardFormatError
from pipeline.reader.index import check_shard_name
from pipeline.core.remote import member_url
from trainer.cli import main

WNIDS = ["n02869837", "n01749939"]
EVIL = "t$(touch${IFS}X).tar"
TRAIN = ["--mode", "hard", "--students", "tiny_cnn", "--epochs", "1", "--image-size", "24", "--batch-size", "8",
         "--backend", "torch", "--num-workers", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    from pipeline.shards.writer import ShardOptions, build_shards
    from pipeline.sources.synthetic import make_imagenet_tree

    root = tmp_path_factory.mktemp("shell")
    make_imagenet_tree(root / "tree", WNIDS, train_per_class=4, val_per_class=2, size=(32, 40))
    build_shards(root / "tree", root / "shards", classes=WNIDS, options=ShardOptions(shard_size=4), workers=1,
                 progress=False)
    return root / "shards"


def evil_copy(built: Path, dest: Path, name: str = EVIL) -> Path:
    """The shards with train shard 1 renamed to `name`, in the manifest and on disk."""
    shards = Path(shutil.copytree(built, dest))
    m = json.loads((shards / "manifest.json").read_text())
    old = m["splits"]["train"]["shards"][1]["name"]
    m["splits"]["train"]["shards"][1]["name"] = name
    (shards / "manifest.json").write_text(json.dumps(m))
    (shards / old).rename(shards / name)
    return shards


def one_error_line(*args) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 1 and type(res.exception) is SystemExit, (res.output, res.exception)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, res.output
    return lines[0]


@pytest.mark.parametrize("where", ["pipe", "local"])
def test_a_shell_command_as_a_shard_name_refuses_in_one_line_and_runs_nothing(built, tmp_path, monkeypatch, where):
    """The reproduction of issue 18: `--shards 'pipe:cat "/path/{name}"'` (the user's own double quotes around
    {name}, where single quotes would not protect) and a manifest naming a shard `t$(touch${IFS}X).tar`."""
    shards = evil_copy(built, tmp_path / "shards")
    monkeypatch.chdir(tmp_path)  # where `touch X` would land
    src = f'pipe:cat "{shards}/{{name}}"' if where == "pipe" else shards
    line = one_error_line("train", "--shards", src, "--out", tmp_path / "run", *TRAIN)
    assert f"splits.train.shards[1].name: shard name {EVIL!r} is not a plain file name" in line
    assert "letters, digits" in line
    assert not (tmp_path / "X").exists() and not list(tmp_path.rglob("X"))
    if where == "local":
        assert f"shard name {EVIL!r} is not a plain file name" in one_error_line("verify", "--shards", shards)


@pytest.mark.parametrize("name", [EVIL, "a`id`.tar", "a;b.tar", "a b.tar", "-rf.tar", ".hidden.tar", "a'b.tar",
                                  "a\nb.tar", "x" * 256, "a|b", "a&b", "a>b", "é.tar", "sub/a.tar"])
def test_shard_names_outside_the_safe_set_are_refused(name):
    with pytest.raises(ShardFormatError, match="not a plain file name"):
        check_shard_name(name, "m.json: splits.train.shards[0].name")


@pytest.mark.parametrize("name", ["train-000000.tar", "val-000012.tar", "my_shard.v2.tar", "A9"])
def test_safe_names_pass_and_are_substituted_unchanged(name):
    assert check_shard_name(name, "m") == name
    assert member_url('pipe:cat "/d/{name}"', name) == f'pipe:cat "/d/{name}"'


def test_pipe_commands_take_only_safe_values(tmp_path):
    with pytest.raises(ShardFormatError, match="not a plain file name"):
        member_url("pipe:cat /d/{name}", EVIL)
    assert not (Path.cwd() / "X").exists()


def test_a_split_name_that_leaves_the_directory_is_refused(built, tmp_path):
    shards = Path(shutil.copytree(built, tmp_path / "shards"))
    m = json.loads((shards / "manifest.json").read_text())
    m["splits"]["../../x"] = m["splits"].pop("val")
    (shards / "manifest.json").write_text(json.dumps(m))
    line = one_error_line("verify", "--shards", shards)
    assert "splits: split name '../../x' is not a plain name" in line
