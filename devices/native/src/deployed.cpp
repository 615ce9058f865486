#include "deployed.h"

#include <fcntl.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>

#include "errors.h"
#include "safetensors.h"

namespace edgemole {

using nlohmann::json;

void save_deployed(const std::string& state_dir, const json& task, const json& body, std::int64_t round,
                   const std::string& run, const TensorMap& state) {
  const std::vector<std::uint8_t> bytes = write_safetensors({{"format", "edgemole-deployed/1"},
                                                             {"task", task.dump()},
                                                             {"body", body.dump()},
                                                             {"round", std::to_string(round)},
                                                             {"run", run}},
                                                            state);
  const std::string path = state_dir + "/" + kDeployedFile, tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw ConfigError("cannot write the deployed model to '" + tmp + "' (does state_dir exist?)");
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n <= 0) {
      ::close(fd);
      throw ConfigError("cannot write the deployed model to '" + tmp + "'");
    }
    done += static_cast<std::size_t>(n);
  }
  ::fsync(fd);
  ::close(fd);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw ConfigError("cannot replace '" + path + "'");
}

DeployedModel::DeployedModel(const DeviceConfig& config) {
  const Manifest manifest = read_manifest(config.artifact);
  verify_files(manifest);
  const std::string path = config.state_dir + "/" + kDeployedFile;
  std::ifstream in(path, std::ios::binary);
  if (!in)
    throw ConfigError("no deployed model in '" + config.state_dir +
                      "' yet (the client writes it after its first round)");
  const std::vector<std::uint8_t> bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  Safetensors file;
  json body;
  try {
    file = read_safetensors(bytes.data(), bytes.size());
    if (file.metadata["format"] != "edgemole-deployed/1") throw ProtocolError("unknown format");
    task_ = parse_task(json::parse(file.metadata.at("task")));
    body = json::parse(file.metadata.at("body"));
    round_ = std::stoll(file.metadata.at("round"));
  } catch (const std::exception& exc) {
    throw ArtifactError(path + ": not a deployed model written by this client (" + first_line(exc.what()) + ")");
  }
  check_task_fits(manifest, task_);
  tokenizer_ = std::make_unique<Tokenizer>(Tokenizer::from_file(config.artifact + "/tokenizer/tokenizer.json"));
  engine_ = std::make_unique<Engine>(manifest, task_, config.threads);
  engine_->set_pad_id(tokenizer_->pad_id());
  const SpecMap expected = engine_->expected_state(body);
  for (const auto& item : expected) {
    if (!file.tensors.count(item.first)) throw ArtifactError(path + ": tensor '" + item.first + "' is missing");
  }
  engine_->set_state(file.tensors, body);
}

json DeployedModel::predict(const std::string& text) {
  const auto start = std::chrono::steady_clock::now();
  const Tokenizer::Encoding e = tokenizer_->encode(text, static_cast<std::size_t>(task_.model.max_length));
  EncodedSplit one;
  one.length = task_.model.max_length;
  one.input_ids = e.input_ids;
  one.attention_mask = e.attention_mask;
  one.labels = {0};
  const std::vector<float> logits = engine_->logits(one, {0});
  double max = logits[0];
  for (float v : logits) max = std::max(max, static_cast<double>(v));
  double z = 0.0;
  for (float v : logits) z += std::exp(static_cast<double>(v) - max);
  json probabilities = json::object();
  std::size_t best = 0;
  for (std::size_t i = 0; i < logits.size(); ++i) {
    probabilities[task_.labels[i]] = std::exp(static_cast<double>(logits[i]) - max) / z;
    if (logits[i] > logits[best]) best = i;
  }
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  return {{"label", task_.labels[best]},
          {"probability", probabilities[task_.labels[best]]},
          {"probabilities", probabilities},
          {"round", round_},
          {"latency_ms", ms}};
}

}  // namespace edgemole
