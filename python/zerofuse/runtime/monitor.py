"""Training metrics to TensorBoard and/or CSV (DeepSpeed's "tensorboard" and
"csv_monitor" config sections), written by rank 0."""
import csv
import os


class Monitor:
    def __init__(self, config, is_main: bool):
        self.writers = []
        if not is_main:
            return
        if config.tensorboard.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("config['tensorboard']['enabled'] is true but tensorboard is not installed "
                                  "(pip install tensorboard)") from None
            path = os.path.join(config.tensorboard.output_path or "runs", config.tensorboard.job_name)
            self.writers.append(_TensorBoard(SummaryWriter(log_dir=path)))
        if config.csv_monitor.enabled:
            path = os.path.join(config.csv_monitor.output_path or "csv_monitor", config.csv_monitor.job_name)
            self.writers.append(_Csv(path))

    @property
    def enabled(self) -> bool:
        return bool(self.writers)

    def write(self, samples: int, values: dict):
        for w in self.writers:
            w.write(samples, {k: v for k, v in values.items() if v is not None})


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def write(self, samples, values):
        for name, value in values.items():
            self.writer.add_scalar(f"Train/Samples/{name}", value, samples)
        self.writer.flush()


class _Csv:
    """One file, metrics.csv: a row per optimizer step."""

    COLUMNS = ("samples", "train_loss", "lr", "loss_scale", "grad_norm")

    def __init__(self, directory):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "metrics.csv")
        self.file = open(self.path, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(self.COLUMNS)

    def write(self, samples, values):
        self.writer.writerow([samples] + [values.get(k, "") for k in self.COLUMNS[1:]])
        self.file.flush()
