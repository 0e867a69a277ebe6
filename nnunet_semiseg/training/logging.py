"""nnU-Net's LocalLogger plus the semi-supervised loss terms: one value per epoch per term, drawn as a fourth
panel of ``progress.png``."""
import math

from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.logging.nnunet_logger import LocalLogger

NONFINITE_LOG_KEY = 'nonfinite_steps_skipped'  # per epoch; not a loss term, so not drawn


class SemiSegLocalLogger(LocalLogger):
    """LocalLogger whose ``progress.png`` adds a panel with every ``train_<term>`` key registered through
    :meth:`add_terms`. Keys missing from an older checkpoint are padded with NaN so the lists stay aligned
    (nnU-Net plots up to the shortest list)."""

    def __init__(self, verbose: bool = False):
        super().__init__(verbose)
        self.term_keys = []

    def add_terms(self, names, num_epochs_done: int) -> None:
        for name in names:
            key = f'train_{name}'
            self.add_series(key, num_epochs_done)
            if key not in self.term_keys:
                self.term_keys.append(key)

    def add_series(self, key: str, num_epochs_done: int) -> None:
        """Make ``key`` loggable once per epoch (NaN for the epochs before it existed); not plotted by itself."""
        values = self.my_fantastic_logging.setdefault(key, [])
        values.extend([math.nan] * max(0, num_epochs_done - len(values)))

    def load_checkpoint(self, checkpoint: dict):
        super().load_checkpoint(checkpoint)
        self.term_keys = [k for k in checkpoint if k.startswith('train_') and k != 'train_losses']

    def plot_progress_png(self, output_folder):
        if not self.term_keys:
            return super().plot_progress_png(output_folder)
        import matplotlib.pyplot as plt
        import seaborn as sns

        log = self.my_fantastic_logging
        epoch = min(len(v) for v in log.values()) - 1
        x = list(range(epoch + 1))
        sns.set(font_scale=2.5)
        fig, axes = plt.subplots(4, 1, figsize=(30, 72))
        ax = axes[0]
        ax2 = ax.twinx()
        ax.plot(x, log['train_losses'][:epoch + 1], color='b', ls='-', label='loss_tr (total)', linewidth=4)
        ax.plot(x, log['val_losses'][:epoch + 1], color='r', ls='-', label='loss_val', linewidth=4)
        ax2.plot(x, log['mean_fg_dice'][:epoch + 1], color='g', ls='dotted', label='pseudo dice', linewidth=3)
        ax2.plot(x, log['ema_fg_dice'][:epoch + 1], color='g', ls='-', label='pseudo dice (mov. avg.)', linewidth=4)
        ax.set_xlabel('epoch'), ax.set_ylabel('loss'), ax2.set_ylabel('pseudo dice')
        ax.legend(loc=(0, 1)), ax2.legend(loc=(0.2, 1))
        durations = [e - s for e, s in zip(log['epoch_end_timestamps'][:epoch + 1], log['epoch_start_timestamps'])]
        axes[1].plot(x, durations, color='b', ls='-', label='epoch duration', linewidth=4)
        axes[1].set(ylim=[0, axes[1].get_ylim()[1]], xlabel='epoch', ylabel='time [s]')
        axes[1].legend(loc=(0, 1))
        axes[2].plot(x, log['lrs'][:epoch + 1], color='b', ls='-', label='learning rate', linewidth=4)
        axes[2].set(xlabel='epoch', ylabel='learning rate')
        axes[2].legend(loc=(0, 1))
        for key in self.term_keys:
            axes[3].plot(x, log[key][:epoch + 1], ls='-', label=key[len('train_'):], linewidth=4)
        # terms differ by orders of magnitude (consistency ~1e-3, supervised ~1): symmetric log scale
        axes[3].set_yscale('symlog', linthresh=1e-3)
        axes[3].set(xlabel='epoch', ylabel='loss term (unweighted)')
        axes[3].legend(loc=(0, 1), ncol=max(1, len(self.term_keys)))
        plt.tight_layout()
        fig.savefig(join(output_folder, 'progress.png'))
        plt.close()
