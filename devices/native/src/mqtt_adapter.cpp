#include "client.h"
#include "errors.h"

namespace edgemole {

std::unique_ptr<Link> make_mqtt_link(const DeviceConfig&, const Topics&, const std::vector<std::uint8_t>&) {
  throw BrokerError("the MQTT link is not built yet");
}

}  // namespace edgemole
