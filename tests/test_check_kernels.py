"""experiments.check_kernels' command line: a shape name it does not know is a usage error."""

import pytest

from experiments import check_kernels


def test_unknown_shape_name_is_a_usage_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    check_kernels.main(["--quick", "--shapes", "fine_k8,nope", "--out", str(tmp_path / "x.json")])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "--shapes: unknown ['nope']" in err and "fine_k8" in err
  assert not (tmp_path / "x.json").exists()
