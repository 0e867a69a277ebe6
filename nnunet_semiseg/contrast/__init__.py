"""Contrastive loss families: one module each (pixel contrast for MONA/ARCO, distillation and anatomical
contrast for ACTION, adaptive supervised contrast for ACTION++), plus the FIFO feature queue they share."""
