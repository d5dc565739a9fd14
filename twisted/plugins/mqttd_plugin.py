from twisted.application.service import ServiceMaker

mqttd = ServiceMaker(
    "mqttd", "mqttd.tap", "An MQTT 3.1/3.1.1/5.0 broker", "mqttd")
