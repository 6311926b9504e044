import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in, d_hidden, d_out):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class BaselineTrainer:
    def __init__(self, model, lr=1e-3):
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def step(self, x, y):
        self.optimizer.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        return loss.item()


class RobustTrainer:
    def __init__(self, model, lr=1e-3):
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def step(self, x, y):
        self.optimizer.zero_grad()
        losses = F.cross_entropy(self.model(x), y, reduction="none")
        loss = losses.sort().values[:-2].mean()
        loss.backward()
        self.optimizer.step()
        return loss.item()


def evaluate(model, loader):
    model.eval()
    correct, total = 0, 0
    with torch.no_grad():
        for x, y in loader:
            pred = model(x).argmax(dim=-1)
            correct += (pred == y).sum().item()
            total += y.numel()
    model.train()
    return correct / total


def run(trainer_cls, train_loader, val_loader, epochs=10, seed=0):
    torch.manual_seed(seed)
    model = MLP(32, 128, 10)
    trainer = trainer_cls(model)
    log = []
    for epoch in range(epochs):
        for x, y in train_loader:
            loss = trainer.step(x, y)
        acc = evaluate(model, val_loader)
        log.append({"epoch": epoch, "loss": loss, "val_acc": acc})
    return log


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out_dir", type=str, default="run_0")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    train_loader, val_loader = make_loaders()
    results = {}
    for name, cls in [("baseline", BaselineTrainer), ("robust", RobustTrainer)]:
        log = run(cls, train_loader, val_loader)
        results[name] = {"means": {"val_acc": log[-1]["val_acc"]}}
    with open(os.path.join(args.out_dir, "final_info.json"), "w") as f:
        json.dump(results, f, indent=2)
