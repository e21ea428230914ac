#pragma once

#include <string>
#include <vector>

#include "layerpack/error.h"
#include "layerpack/tokenizer.h"
#include "layerpack/tokenizer_generated.h"

namespace layerpack {

// Renders a conversation with the structured template stored in tokenizer.lpk.
// source_path names the file in error messages.
Result<std::string> render_chat_template(const fb::ChatTemplate* chat_template, const std::string& source_path,
                                         const std::vector<ChatMessage>& messages, bool add_generation_prompt);
const char* chat_template_family_name(fb::ChatTemplateFamily family);

}  // namespace layerpack
