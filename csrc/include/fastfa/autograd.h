// What the layer ops' C++ autograd (csrc/autograd.cpp) offers the binding's LayerCall.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastfa {

// Where `output` came from a layer op's backward node (csrc/autograd.cpp), point that node's
// feedback edge at `feedback` (B in its own dtype, e.g. an fp32 Parameter) and return true;
// else change nothing and return false. The op was called with a copy of B cast to the layer's
// dtype that records no autograd node (LayerCall under autocast): B's gradient, computed in the
// layer's dtype, then reaches B cast to B's dtype by the autograd engine (which casts every
// gradient to its edge's dtype), as the cast's own node (ToCopyBackward) would have done it, with
// one autograd node less per step.
bool route_feedback_gradient(const at::Tensor& output, const at::Tensor& feedback);

} // namespace fastfa
