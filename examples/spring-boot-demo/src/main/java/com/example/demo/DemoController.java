package com.example.demo;

import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.web.bind.annotation.RequestMapping;
import org.springframework.web.bind.annotation.RestController;

/** The seed's controller: answers with the time, so a restored JVM shows it is live. */
@RestController
public class DemoController {
    private static final Logger logger = LoggerFactory.getLogger(DemoController.class);

    @RequestMapping("/")
    public String index() {
        String message = "at " + java.time.Clock.systemUTC().instant();
        logger.info("Message: {}", message);
        return "Hello " + message;
    }
}
