"""fedtrain: federated, privacy-preserving PyTorch training (Flower + Opacus + AES-GCM)."""

__version__ = "0.1.0"
