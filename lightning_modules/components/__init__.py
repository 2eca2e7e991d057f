"""Plain ``nn.Module`` building blocks, kept apart from the LightningModules that train them."""
