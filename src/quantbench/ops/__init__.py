"""Operations: the Hydra app and its sweep callback, the `quantbench` command, the tracking server, the install check."""
