// Everything the zerofuse core offers, in one include.
#pragma once

#include "zerofuse/adam.h"
#include "zerofuse/attention.h"
#include "zerofuse/bias_gelu.h"
#include "zerofuse/build_info.h"
#include "zerofuse/cross_entropy.h"
#include "zerofuse/error.h"
#include "zerofuse/flat_plan.h"
#include "zerofuse/grad_stats.h"
#include "zerofuse/half.h"
#include "zerofuse/layernorm.h"
#include "zerofuse/loss_scaler.h"
#include "zerofuse/masked_softmax.h"
#include "zerofuse/step_control.h"
#include "zerofuse/stream.h"
#include "zerofuse/tensor.h"
