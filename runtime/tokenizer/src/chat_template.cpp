// Chat templates as structured data: the importer recognised the Jinja
// template's family and stored its parameters; rendering here mirrors the
// Jinja text of each family exactly (verified against jinja2 by the fixtures).
#include "chat_template.h"

namespace layerpack {
namespace {

std::string str(const flatbuffers::String* s) { return s ? s->str() : std::string(); }

// Python str.strip() / Jinja's trim: Unicode whitespace at both ends.
std::string strip(const std::string& text) {
  const char* ws = " \t\n\r\v\f";
  size_t begin = text.find_first_not_of(ws);
  if (begin == std::string::npos) return {};
  size_t end = text.find_last_not_of(ws);
  return text.substr(begin, end - begin + 1);
}

Error conversation_error(const std::string& path, const std::string& what) {
  return file_error(ErrorCode::invalid_argument, path, "chat template: " + what);
}

}  // namespace

const char* chat_template_family_name(fb::ChatTemplateFamily family) {
  switch (family) {
    case fb::ChatTemplateFamily::chatml: return "chatml";
    case fb::ChatTemplateFamily::llama3: return "llama3";
    case fb::ChatTemplateFamily::llama2: return "llama2";
    case fb::ChatTemplateFamily::mistral: return "mistral";
    case fb::ChatTemplateFamily::zephyr: return "zephyr";
    default: return "none";
  }
}

Result<std::string> render_chat_template(const fb::ChatTemplate* chat_template, const std::string& source_path,
                                         const std::vector<ChatMessage>& messages, bool add_generation_prompt) {
  if (!chat_template || chat_template->family() == fb::ChatTemplateFamily::none) {
    std::string why = chat_template && chat_template->recognised_as() ? chat_template->recognised_as()->str() : "";
    return file_error(ErrorCode::unsupported, source_path,
                      "this model has no chat template layerpack can render" + (why.empty() ? "" : " (" + why + ")") +
                          "; use a plain prompt instead (ask for it explicitly, e.g. --plain-prompt)");
  }
  const std::string bos = str(chat_template->bos_token());
  const std::string eos = str(chat_template->eos_token());
  const bool trim = chat_template->trim_content();
  auto content_of = [&](const ChatMessage& m) { return trim ? strip(m.content) : m.content; };
  std::string out;
  switch (chat_template->family()) {
    case fb::ChatTemplateFamily::chatml: {
      if (chat_template->bos_at_start()) out += bos;
      const std::string default_system = str(chat_template->default_system());
      for (size_t i = 0; i < messages.size(); ++i) {
        if (i == 0 && messages[0].role != "system" && !default_system.empty())
          out += "<|im_start|>system\n" + default_system + "<|im_end|>\n";
        out += "<|im_start|>" + messages[i].role + "\n" + content_of(messages[i]) + "<|im_end|>\n";
      }
      if (add_generation_prompt) out += "<|im_start|>assistant\n";
      break;
    }
    case fb::ChatTemplateFamily::llama3: {
      for (size_t i = 0; i < messages.size(); ++i) {
        if (i == 0 && chat_template->bos_at_start()) out += bos;
        out += "<|start_header_id|>" + messages[i].role + "<|end_header_id|>\n\n" + content_of(messages[i]) +
               "<|eot_id|>";
      }
      if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      break;
    }
    case fb::ChatTemplateFamily::llama2: {
      size_t first = 0;
      std::string system;
      bool has_system = !messages.empty() && messages[0].role == "system";
      if (has_system) {
        system = messages[0].content;
        first = 1;
      }
      for (size_t i = first; i < messages.size(); ++i) {
        size_t index = i - first;
        bool is_user = messages[i].role == "user";
        if (is_user != (index % 2 == 0))
          return conversation_error(source_path, "conversation roles must alternate user/assistant/user/assistant/...");
        std::string content = messages[i].content;
        if (index == 0 && has_system) content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content;
        if (is_user)
          out += bos + "[INST] " + strip(content) + " [/INST]";
        else if (messages[i].role == "assistant")
          out += " " + strip(content) + " " + eos;
      }
      break;  // the Llama 2 template has no generation prompt: the model answers after [/INST]
    }
    case fb::ChatTemplateFamily::mistral: {
      out += bos;
      for (size_t i = 0; i < messages.size(); ++i) {
        const auto& m = messages[i];
        if ((m.role == "user") != (i % 2 == 0))
          return conversation_error(source_path, "conversation roles must alternate user/assistant/user/assistant/...");
        if (m.role == "user")
          out += "[INST] " + m.content + " [/INST]";
        else if (m.role == "assistant")
          out += m.content + eos;
        else
          return conversation_error(source_path, "only user and assistant roles are supported, got '" + m.role + "'");
      }
      break;
    }
    case fb::ChatTemplateFamily::zephyr: {
      for (size_t i = 0; i < messages.size(); ++i) {
        const auto& m = messages[i];
        if (m.role == "user" || m.role == "system" || m.role == "assistant")
          out += "<|" + m.role + "|>\n" + content_of(m) + eos + "\n";
        if (i + 1 == messages.size() && add_generation_prompt) out += "<|assistant|>\n";
      }
      break;
    }
    default:
      return file_error(ErrorCode::corrupt, source_path, "unknown chat template family");
  }
  return out;
}

}  // namespace layerpack

namespace layerpack {
std::string render_plain_prompt(const std::vector<ChatMessage>& messages, bool add_generation_prompt) {
  std::string out;
  for (const auto& m : messages) out += m.role + ": " + m.content + "\n";
  if (add_generation_prompt) out += "assistant: ";
  return out;
}
}  // namespace layerpack
