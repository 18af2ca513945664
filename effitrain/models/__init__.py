"""Model families. The `model` config group names a class or factory with `_target_`;
every built-in one takes `input_shape` and `num_classes` (interpolated from `data`)."""
