"""Data: raw dataset layouts and readers (`sources`, `synthetic`, `archives`), training crops
(`crops`), the U-Net border weight maps (`weightmap`) and the torch datasets the stages load
(`loading`)."""
