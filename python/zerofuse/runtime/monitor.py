"""Training metrics as files: a CSV log and TensorBoard events, used by the
engine's monitor (DeepSpeed's "tensorboard" and "csv_monitor" config
sections, written by rank 0) and by `zerofuse train`.

A run that resumes from a checkpoint keeps the rows up to the checkpoint and
drops those after it (they belong to the lost future); a run that starts
afresh starts an empty file, so a step is never written twice.
"""
import csv
import os
from typing import Iterable, Optional


class CsvLog:
    """Rows of `columns` in one CSV file, ordered by the numeric `key` column."""

    def __init__(self, path: str, columns: Iterable[str], key: str):
        self.path = path
        self.columns = tuple(columns)
        self.key = key
        if key not in self.columns:
            raise ValueError(f"CsvLog: 'key' {key!r} must be one of the columns {self.columns}")
        self._file = None
        self._writer = None

    @property
    def started(self) -> bool:
        return self._file is not None

    def start(self, resume_after: Optional[float] = None):
        """Open the log: keep the rows whose key is <= resume_after (none when
        None: a fresh run), rewritten under a temporary name and renamed."""
        self.close()
        rows = []
        if resume_after is not None and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get(self.key) and float(r[self.key]) <= resume_after]
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, self.columns, extrasaction="ignore")
        return self

    def write(self, row: dict):
        if not self.started:
            self.start()
        self._writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in self.columns})
        self._file.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None


class TensorBoardLog:
    """Scalars to TensorBoard event files under `log_dir`."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        self.writer = SummaryWriter(log_dir=log_dir)

    def write(self, x: float, values: dict, prefix: str = ""):
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(prefix + name, value, x)
        self.writer.flush()

    def close(self):
        self.writer.close()


class Monitor:
    """The engine's metrics, one row per optimizer step, by training samples."""

    COLUMNS = ("samples", "train_loss", "lr", "loss_scale", "grad_norm")

    def __init__(self, config, is_main: bool, extra_columns=()):
        """extra_columns: metrics beyond COLUMNS that this engine writes (a pipeline's bubble)."""
        self.csv = None
        self.tensorboard = None
        if not is_main:
            return
        if config.tensorboard.enabled:
            try:
                self.tensorboard = TensorBoardLog(
                    os.path.join(config.tensorboard.output_path or "runs", config.tensorboard.job_name))
            except ImportError:
                raise ImportError("config['tensorboard']['enabled'] is true but tensorboard is not installed "
                                  "(pip install tensorboard)") from None
        if config.csv_monitor.enabled:
            directory = os.path.join(config.csv_monitor.output_path or "csv_monitor", config.csv_monitor.job_name)
            self.csv = CsvLog(os.path.join(directory, "metrics.csv"), self.COLUMNS + tuple(extra_columns),
                              key="samples")

    @property
    def enabled(self) -> bool:
        return self.csv is not None or self.tensorboard is not None

    def resume(self, samples: int):
        """Training continues from a checkpoint taken after `samples` samples."""
        if self.csv is not None:
            self.csv.start(resume_after=samples)

    def write(self, samples: int, values: dict):
        if self.tensorboard is not None:
            self.tensorboard.write(samples, values, prefix="Train/Samples/")
        if self.csv is not None:
            self.csv.write(dict(values, samples=samples))
