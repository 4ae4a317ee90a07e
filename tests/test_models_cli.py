import re
import subprocess
import sys

import torch

from skinray.models import create_model, get_model_spec, list_models


def test_cli_builds_every_model_and_prints_its_parameter_count():
    result = subprocess.run(
        [sys.executable, "-m", "skinray.models", "--config", "smoke"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    printed = {}
    for line in result.stdout.splitlines():
        match = re.match(r"(\S+)\s+([\d.]+) M params", line)
        if match:
            printed[match.group(1)] = float(match.group(2))
    assert set(printed) == set(list_models())
    for name, millions in printed.items():
        torch.manual_seed(0)
        model = create_model(name, **get_model_spec(name).smoke_kwargs)
        assert millions == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
