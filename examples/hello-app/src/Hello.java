import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import java.io.IOException;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.concurrent.atomic.AtomicLong;

/**
 * A tiny HTTP app for crac-agent's tests and bench. No dependencies: com.sun.net.httpserver only.
 *
 * <p>GET / answers "hello N" where N counts the requests to / since the JVM started; the counter
 * lives only in memory, so a restored JVM that answers "hello 201" after a warm-up of 200 requests
 * proves its heap came back. GET /ready answers "ok" (readiness); GET /never answers 503 forever
 * (a readiness check that never passes). GET /exit-on-next-ready (for tests, as a warm-up request)
 * makes the next GET /ready end the JVM with status 3: an image taken after it never comes back
 * ready.
 *
 * <p>Configuration: the port is the first argument, else $HELLO_PORT, else 8080; the bind
 * address is $HELLO_HOST (default 127.0.0.1). $HELLO_SHUTDOWN_FILE, when set, is written by a
 * shutdown hook (proves SIGTERM reached the JVM).
 */
public final class Hello {
    private static final AtomicLong COUNTER = new AtomicLong();
    private static volatile boolean exitOnNextReady;

    public static void main(String[] args) throws IOException {
        int port = Integer.parseInt(args.length > 0 ? args[0] : env("HELLO_PORT", "8080"));
        String host = env("HELLO_HOST", "127.0.0.1");
        HttpServer server = HttpServer.create(new InetSocketAddress(InetAddress.getByName(host), port), 64);
        server.createContext("/", exchange -> {
            if (!exchange.getRequestURI().getPath().equals("/")) {
                reply(exchange, 404, "not found\n");
                return;
            }
            reply(exchange, 200, "hello " + COUNTER.incrementAndGet() + "\n");
        });
        server.createContext("/ready", exchange -> {
            if (exitOnNextReady) {
                System.out.println("hello-app: exiting on readiness, as asked");
                Runtime.getRuntime().halt(3);
            }
            reply(exchange, 200, "ok\n");
        });
        server.createContext("/exit-on-next-ready", exchange -> {
            exitOnNextReady = true;
            reply(exchange, 200, "armed\n");
        });
        server.createContext("/never", exchange -> reply(exchange, 503, "never ready\n"));
        server.start();

        String shutdownFile = System.getenv("HELLO_SHUTDOWN_FILE");
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            System.out.println("hello-app: shutting down after " + COUNTER.get() + " requests");
            if (shutdownFile != null) {
                try {
                    Files.writeString(Path.of(shutdownFile), "stopped " + COUNTER.get() + "\n");
                } catch (IOException e) {
                    System.err.println("hello-app: cannot write " + shutdownFile + ": " + e);
                }
            }
        }));
        System.out.println("hello-app: listening on " + host + ":" + port);
    }

    private static String env(String name, String fallback) {
        String value = System.getenv(name);
        return value == null || value.isEmpty() ? fallback : value;
    }

    private static void reply(HttpExchange exchange, int status, String body) throws IOException {
        byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
        exchange.getResponseHeaders().set("Content-Type", "text/plain; charset=utf-8");
        exchange.sendResponseHeaders(status, bytes.length);
        try (OutputStream out = exchange.getResponseBody()) {
            out.write(bytes);
        }
    }
}
