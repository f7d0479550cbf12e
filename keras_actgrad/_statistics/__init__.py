"""Statistics of tapped tensors: moments on the device, closed forms on the host.

`moments.py` (portable, `keras.ops`) <- `moments_tensorflow.py`,
`moments_torch.py` (native fast paths, chosen by the backend dispatcher);
`statistics.py`: the statistic names, the reducer and the closed forms.
This file imports nothing, so the backends can import `moments` without
importing the reducer.
"""
