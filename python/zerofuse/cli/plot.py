"""loss.png: training and validation loss against tokens seen."""
import csv
import os


def plot_losses(metrics_csv: str, out_png: str, title: str = "zerofuse train"):
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train, val = ([], []), ([], [])
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            tokens = int(row["tokens"])
            if row["train_loss"]:
                train[0].append(tokens)
                train[1].append(float(row["train_loss"]))
            if row["val_loss"]:
                val[0].append(tokens)
                val[1].append(float(row["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(*train, label="train", linewidth=1.0, alpha=0.8)
    if val[0]:
        ax.plot(*val, "o-", label="validation", linewidth=1.5)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)
