"""The ClientApp: open the global model, train with DP-SGD, keep the privacy ledger, reply."""
